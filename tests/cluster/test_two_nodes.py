"""Two Ray nodes on this machine (tests/cluster/ray_start.py) that share nothing but a bucket (a
real S3-protocol server on loopback, tests/s3_server.py, holding the data set and the run folder):
the head and a second node with a resource of its own, 3 CPUs each. A 2-worker training with 2 CPUs per worker cannot put both
workers on one node (train/cluster_fit.py places it so: each node keeps 1 CPU for Ray Data), so
one worker runs on each node; where each ran is read from Ray's State API. The second node is
then killed mid-run (its raylet, SIGKILL): the run ends with one clear line that says what to
do; the node comes back, the same command again resumes from the latest checkpoint and
finishes, every epoch once in metrics.json."""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from fvae_dist.data.prepare import upload_dataset
from fvae_dist.storage import UriPath
from fvae_dist.train.trainer import completed_epochs
from tests.cluster.ray_start import FVAE_DIST, kill, ray_cluster
from tests.s3_server import s3_server
from tests.toy_dataset import tiny_overrides

EPOCHS = 4  # tiny epochs: the second node dies right after the first, while some are left
NODE2 = {"node2": 1}


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_two_workers_on_two_nodes_and_the_second_node_killed_mid_run(tmp_path, toy_dir, monkeypatch):
    with s3_server() as s3:
        for key, value in s3.env.items():  # the nodes' processes, the driver and this test read the bucket
            monkeypatch.setenv(key, value)
        storage = s3.make_bucket("fvae") + "/runs"
        run_dir = UriPath.parse(f"{storage}/two")
        upload_dataset(toy_dir, UriPath.parse("s3://fvae/data/toy"))
        _train_on_two_nodes(tmp_path, "s3://fvae/data/toy", storage, run_dir)


def _train_on_two_nodes(tmp_path, dataset, storage, run_dir):
    with ray_cluster(tmp_path) as cluster:
        cluster.start_head(num_cpus=3)
        cluster.add_node(num_cpus=3, resources=NODE2)
        command = [str(FVAE_DIST), "train", f"ray.address={cluster.address}", "ray.num_workers=2",
                   "ray.cpus_per_worker=2", "ray.max_failures=0",
                   *tiny_overrides(dataset, storage, "two", f"train.epochs={EPOCHS}", "train.cpu_kernels=off")]

        started = time.monotonic()
        with open(tmp_path / "first.log", "wb") as out:
            first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cluster.driver_env())
        try:
            _wait(lambda: completed_epochs(run_dir) >= 1 or first.poll() is not None, 600, "the first epoch")
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            print(f"\nepoch 1 done {time.monotonic() - started:.0f} s after the start")
            killed = time.monotonic()
            kill(cluster.nodes[1].raylet())
            placement = _worker_nodes(cluster)  # Ray's State API keeps the dead workers and their nodes
            print(f"workers by node: {placement}")
            assert sorted(placement.values()) == ["head", "node2"], placement
            returncode = first.wait(timeout=600)
            print(f"the run ended {time.monotonic() - killed:.0f} s after node2's raylet was killed, "
                  f"exit status {returncode}")
        finally:
            if first.poll() is None:
                first.kill()
        first_output = (tmp_path / "first.log").read_text()
        assert returncode != 0, first_output[-4000:]
        # one line says it (Ray's progress bars, which end in carriage returns, and the log lines
        # of the dying run may come before and after it)
        said = re.findall(r"fvae-dist train: error: [^\r\n]*", first_output)
        assert len(said) == 1, first_output[-4000:]
        assert re.match(rf"fvae-dist train: error: two: training stopped after \d of {EPOCHS} epochs because the Ray "
                        r"cluster lost a Train worker \(.*\) and ray.max_failures=0 allows no restart; rerun the same "
                        r"command", said[0]), said
        done_before = completed_epochs(run_dir)
        assert 1 <= done_before < EPOCHS

        cluster.wait_for_nodes(1)
        cluster.add_node(num_cpus=3, resources=NODE2)
        resumed = time.monotonic()
        second = subprocess.run(command, capture_output=True, text=True, env=cluster.driver_env(), timeout=600)
        print(f"the rerun finished in {time.monotonic() - resumed:.0f} s")
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        # the newest checkpoint: the one metrics.json counts, or one newer, as metrics.json is written
        # just after an epoch's checkpoint and a node lost in between leaves the checkpoint uncounted
        resumed_from = re.findall(r"resuming from checkpoint_epoch(\d{4})", second.stdout + second.stderr)
        assert resumed_from, second.stdout[-4000:]
        assert done_before - 1 <= int(resumed_from[0]) <= done_before, (resumed_from, done_before)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_completed"] == EPOCHS
    assert [row["epoch"] for row in metrics["history"]] == list(range(EPOCHS))


def _worker_nodes(cluster) -> dict[str, str]:
    """Train worker actor id -> "head" or "node2", the node it runs on (Ray's State API)."""
    nodes = {node["node_id"]: ("node2" if "node2" in (node.get("resources_total") or {}) else "head")
             for node in cluster.ray_json("list", "nodes")}
    actors = cluster.ray_json("list", "actors", "--filter", "class_name=RayTrainWorker", "--detail")
    print("workers (actor id: node id):", {a["actor_id"][:12]: a["node_id"] for a in actors})
    return {actor["actor_id"][:12]: nodes[actor["node_id"]] for actor in actors}


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)
