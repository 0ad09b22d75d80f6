"""A Ray cluster on this machine, started as a real one is: `ray start --head`, then
`ray start --address` for each further node, every node a process tree of its own.

It never meets another Ray instance on the machine (another test's, a long training's): its own
ports, its own --temp-dir (short, for Ray's Unix socket paths), its own token. It listens on
127.0.0.1 only: the head's node address is 127.0.0.1 in Ray's single-machine mode
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, see fvae_dist/train/local_ray.py). A further node cannot
join such a head with plain `ray start --address 127.0.0.1:PORT` in Ray 2.60: it turns 127.0.0.1
into the machine's outward address, where the head does not listen (ray-project/ray#59110), and
the single-machine mode makes `ray start` refuse further nodes. So a further node's `ray start`
runs with that rewriting switched off (JOIN_ON_LOOPBACK) and --node-ip-address=127.0.0.1. Token
authentication as Ray 2.60 sets it up: RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN for
every node.

    with ray_cluster(tmp_path) as cluster:
        cluster.start_head(num_cpus=2)
        cluster.add_node(num_cpus=3, resources={"node2": 1})
        subprocess.run([... "fvae-dist", "submit", "--address", cluster.dashboard_url, ...],
                       env=cluster.client_env())
    # every process of every node has been ended (by pid: `ray stop` would stop every Ray on
    # the machine), also when the block raised

`ray start --block` keeps each node's starter in the foreground, the parent of the node's
processes, which are found as its descendants (the job drivers and workers included).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

from fvae_dist.train.cluster_guard import end_processes
from fvae_dist.train.local_ray import free_local_port

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
FVAE_DIST = VENV_BIN / "fvae-dist"
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
START_ATTEMPTS = 3
# On a busy machine the dashboard agent can take longer to start than the raylet waits for it
# by default ("Timed out waiting for file .../metrics_agent_port_...", the node never starts).
PATIENT_RAY = {"RAY_agent_register_timeout_ms": "300000"}


# `ray start`, with Ray's rewriting of 127.0.0.1 into the outward address switched off.
JOIN_ON_LOOPBACK = ("import ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
                    "from ray.scripts.scripts import main; main()")


@dataclass
class Node:
    starter: subprocess.Popen
    log: Path
    resources: dict = field(default_factory=dict)

    def _wait_for_job_server(self) -> None:
        # `ray start` returns before the dashboard's modules answer
        request = urllib.request.Request(f"{self.dashboard_url}/api/jobs/",
                                         headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30):
                    return
            except OSError:  # refused, reset, timed out, HTTP 5xx while starting
                assert time.monotonic() < deadline, "the head's job server did not answer"
                time.sleep(2)

    def processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.starter.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def raylet(self) -> psutil.Process:
        return next(p for p in self.processes() if p.name() == "raylet")


class RayCluster:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.token = secrets.token_hex(32)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fvr-", dir="/tmp"))
        self.gcs_port = free_local_port()
        self.dashboard_port = free_local_port()
        self.nodes: list[Node] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, num_cpus: int, resources: dict | None = None) -> Node:
        args = ["--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_local_port()}"]
        node = self._start(args, num_cpus, resources, head=True)
        self._wait_for_job_server()
        return node

    def add_node(self, num_cpus: int, resources: dict | None = None) -> Node:
        alive = len(self.alive_nodes())
        node = self._start([f"--address={self.address}", "--node-ip-address=127.0.0.1"], num_cpus, resources,
                           head=False)
        self.wait_for_nodes(alive + 1)
        return node

    def client_env(self) -> dict[str, str]:
        """Environment of a process that talks to the cluster from outside (`fvae-dist submit`,
        `fvae-dist train ray.address=...`): the token, and nothing of other Ray instances."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_TOKEN=self.token, PYTHONPATH=str(REPO),
                   PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
        return env

    def driver_env(self) -> dict[str, str]:
        """Environment of a driver that joins the cluster itself (`fvae-dist train
        ray.address=127.0.0.1:PORT`): ray.init, too, turns 127.0.0.1 into the outward address
        (ray-project/ray#59110) unless Ray's single-machine mode is on."""
        return {**self.client_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def ray_json(self, *args: str) -> list | dict:
        """`ray <args> --format json` against this cluster's State API."""
        env = {**self.client_env(), "RAY_AUTH_MODE": "token"}
        out = subprocess.run([str(RAY), *args, "--address", self.dashboard_url, "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=120, check=True).stdout
        return json.loads(out[out.index("[") if "[" in out else out.index("{"):])

    def alive_nodes(self) -> list[dict]:
        return [node for node in self.ray_json("list", "nodes") if node.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) != count:
            assert time.monotonic() < deadline, f"the cluster did not reach {count} alive nodes"
            time.sleep(2)

    def _wait_for_job_server(self) -> None:
        # `ray start` returns before the dashboard's modules answer
        request = urllib.request.Request(f"{self.dashboard_url}/api/jobs/",
                                         headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30):
                    return
            except OSError:  # refused, reset, timed out, HTTP 5xx while starting
                assert time.monotonic() < deadline, "the head's job server did not answer"
                time.sleep(2)

    def processes(self) -> list[psutil.Process]:
        return [p for node in self.nodes for p in [psutil.Process(node.starter.pid), *node.processes()]
                if p.is_running()]

    def stop(self) -> None:
        """End every process of every node, by pid."""
        processes = [p for node in self.nodes for p in node.processes()]
        end_processes([*processes, *(psutil.Process(n.starter.pid) for n in self.nodes if n.starter.poll() is None)])
        for node in self.nodes:
            node.starter.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _node_env(self, head: bool) -> dict[str, str]:
        env = self.client_env()
        env.update(RAY_AUTH_MODE="token", **PATIENT_RAY,
                   # fixed default ports (44217, 44227) that another cluster on the machine holds
                   AUTOSCALER_METRIC_PORT="0", DASHBOARD_METRIC_PORT="0")
        if head:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the head's node address: 127.0.0.1
        return env

    def _start(self, args: list[str], num_cpus: int, resources: dict | None, head: bool) -> Node:
        """`ray start --block ...` until it says the node runs; a node that did not come up in
        time (a busy machine: "The current node timed out during startup") is started again."""
        for attempt in range(1, START_ATTEMPTS + 1):
            node = self._launch(args, num_cpus, resources, head, attempt)
            seen: set[psutil.Process] = set()
            deadline = time.monotonic() + START_TIMEOUT_S
            while b"Ray runtime started" not in node.log.read_bytes():
                seen.update(node.processes())
                assert time.monotonic() < deadline, f"ray start did not finish:\n{node.log.read_text()[-3000:]}"
                if node.starter.poll() is not None:
                    break
                time.sleep(1)
            else:
                self.nodes.append(node)
                return node
            end_processes(seen)  # what the failed start left
            assert attempt < START_ATTEMPTS, f"ray start exited:\n{node.log.read_text()[-3000:]}"
        raise AssertionError("unreachable")

    def _launch(self, args: list[str], num_cpus: int, resources: dict | None, head: bool, attempt: int) -> Node:
        log = self.workdir / f"ray_start_{len(self.nodes)}_{attempt}.log"
        ray = [str(RAY)] if head else [sys.executable, "-c", JOIN_ON_LOOPBACK]
        # The agents' ports are chosen here: with a port left to them, the raylet waits a fixed
        # 15 s for each to be written to a file and aborts the node when the agent is slower to
        # start (a busy machine: "Timed out waiting for file .../metrics_agent_port_...").
        agent_ports = [f"--dashboard-agent-listen-port={free_local_port()}",
                       f"--dashboard-agent-grpc-port={free_local_port()}",
                       f"--metrics-export-port={free_local_port()}", f"--runtime-env-agent-port={free_local_port()}"]
        command = [*ray, "start", "--block", *args, f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
                   *agent_ports, "--disable-usage-stats"]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        with open(log, "wb") as out:
            starter = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self._node_env(head),
                                       cwd=self.workdir, start_new_session=True)
        return Node(starter, log, resources or {})


@contextmanager
def ray_cluster(workdir: Path) -> Iterator[RayCluster]:
    cluster = RayCluster(workdir)
    try:
        yield cluster
    finally:
        cluster.stop()


def kill(process: psutil.Process) -> None:
    process.send_signal(signal.SIGKILL)
