"""The local Ray cluster `fvae-dist train` starts for itself (train/local_ray.py), seen from
outside while a run trains on it: every listening socket of its processes is on 127.0.0.1, the
dashboard refuses a request without the token, the token is in no output and no run folder, and
a driver killed with SIGKILL leaves none of the cluster's processes behind (train/cluster_guard.py).

The processes of the cluster are the driver's descendants once the run trains: gcs_server, the
raylet, the dashboard and its modules, the agents, the autoscaler monitor, the log monitor, the
Train workers and controller, Ray Data's coordinators, the feeders.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fvae_dist.train.cluster_guard import end_processes
from tests.toy_dataset import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
FVAE_DIST = Path(sys.executable).with_name("fvae-dist")
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
# Ray 2.60 components that cannot be bound to loopback (process name -> why): none.
NOT_ON_LOOPBACK: dict[str, str] = {}
# How long the cluster's processes may outlive a SIGKILLed driver: the guard's SIGTERM grace
# (cluster_guard.GRACE_S) plus room for a busy machine. Without the guard, Ray's agents took a
# minute.
GONE_WITHIN_S = 30
TRAINING_WITHIN_S = 400
# On a busy machine the dashboard agent can take longer to start than the raylet waits for it
# by default ("Timed out waiting for file .../metrics_agent_port_...", the node never starts).
PATIENT_RAY = {"RAY_agent_register_timeout_ms": "300000"}


@dataclass
class RunningTrain:
    driver: subprocess.Popen
    processes: list[psutil.Process]
    token: str
    run_dir: Path
    log: Path


@pytest.fixture(scope="module")
def running_train(tmp_path_factory, toy_dir):
    """`fvae-dist train` with a local cluster, its token in a file of the test's (not the user's
    ~/.ray/auth_token), training (one of many epochs); killed at the end if still running."""
    tmp = tmp_path_factory.mktemp("local_cluster")
    token = secrets.token_hex(32)
    (tmp / "auth_token").write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no cluster, token or mode of the caller
    env.update(RAY_AUTH_TOKEN_PATH=str(tmp / "auth_token"), PYTHONPATH=str(REPO), **PATIENT_RAY)
    run_dir = tmp / "runs" / "local"
    log = tmp / "driver.log"
    # train.cpu_kernels=off: no compiler run in the way (the fast paths are not what is tested here)
    args = tiny_overrides(toy_dir, tmp / "runs", "local", "train.epochs=200", "ray.num_cpus=2", "train.cpu_kernels=off")
    with open(log, "wb") as out:
        driver = subprocess.Popen([str(FVAE_DIST), "train", *args], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, cwd=tmp)
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + TRAINING_WITHIN_S
        while not training(processes) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
            processes = psutil.Process(driver.pid).children(recursive=True)
        assert driver.poll() is None and training(processes), log.read_text()[-3000:]
        yield RunningTrain(driver, processes, token, run_dir, log)
    finally:
        driver.kill()
        driver.wait()
        end_processes(processes, grace_s=2)


def training(processes: list[psutil.Process]) -> bool:
    """The Train workers run and read their days through Ray Data (its split coordinators)."""
    names = " ".join(describe(p) for p in processes)
    return "RayTrainWorker" in names and "SplitCoordinator" in names


def describe(process: psutil.Process) -> str:
    """The process's name and command line (Ray's own processes rename themselves, ray::...)."""
    try:
        return f"{process.name()}: {' '.join(process.cmdline())}"
    except psutil.Error:
        return f"pid {process.pid} (gone)"


@pytest.mark.ray
@pytest.mark.timeout(600)  # the first test of the module starts the cluster and the run
def test_every_listening_socket_of_the_local_cluster_is_on_loopback(running_train):
    listening = []
    for process in [psutil.Process(running_train.driver.pid), *running_train.processes]:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        listening += [(describe(process)[:90], c.laddr.ip, c.laddr.port) for c in connections
                      if c.status == psutil.CONN_LISTEN]
    print("\nlistening sockets of the local cluster:")
    for name, ip, port in sorted(listening):
        print(f"  {ip}:{port:<6d} {name}")
    names = " ".join(describe(p) for p in running_train.processes)
    for component in ("gcs_server", "raylet", "dashboard.py", "DashboardAgent", "RuntimeEnvAgent", "RayTrainWorker"):
        assert component in names, f"{component} not among the cluster's processes: {names}"
    exposed = [(name, ip, port) for name, ip, port in listening
               if ip not in LOOPBACK and not any(known in name for known in NOT_ON_LOOPBACK)]
    assert listening and not exposed, exposed


@pytest.mark.ray
@pytest.mark.timeout(600)  # the first test of the module starts the cluster and the run
def test_the_local_cluster_asks_for_its_token(running_train):
    match = re.search(r"dashboard at \S*?http://127\.0\.0\.1:(\d+)", running_train.log.read_text())
    assert match, running_train.log.read_text()[-3000:]
    url = f"http://127.0.0.1:{match.group(1)}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code == 401
    with_token = urllib.request.Request(url, headers={"Authorization": f"Bearer {running_train.token}"})
    with urllib.request.urlopen(with_token, timeout=30) as answer:
        assert answer.status == 200


@pytest.mark.ray
@pytest.mark.timeout(600)  # the first test of the module starts the cluster and the run
def test_a_killed_driver_leaves_no_process_of_its_cluster_and_no_token(running_train):
    killed = time.monotonic()
    os.kill(running_train.driver.pid, signal.SIGKILL)
    running_train.driver.wait()
    _, alive = psutil.wait_procs(running_train.processes, timeout=GONE_WITHIN_S)
    print(f"\n{len(running_train.processes)} processes of the cluster gone {time.monotonic() - killed:.1f} s "
          "after the driver's SIGKILL")
    assert not alive, [describe(p)[:90] for p in alive]

    output = running_train.log.read_bytes()
    assert b"multiple active Ray instances" not in output  # with another Ray on the machine (a second test run)
    token = running_train.token.encode()
    assert token not in output
    written = [path for path in running_train.run_dir.rglob("*") if path.is_file()]
    assert written and not [path for path in written if token in path.read_bytes()]
