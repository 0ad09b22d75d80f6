"""A real Ray cluster on loopback (`ray start --head`, tests/cluster/ray_start.py) and a demo-sized
training submitted to it with `fvae-dist submit`: the job succeeds, its run folder holds the
epochs in metrics.json, TensorBoard events and checkpoints, and neither the output nor the run
folder holds the cluster's token. While the job trains, every listening socket of the cluster's
processes (the job's driver and workers included) is on 127.0.0.1. A second, longer training
stopped with `ray job stop` leaves none of its processes on the cluster."""
from __future__ import annotations

import json
import re
import subprocess
import time

import psutil
import pytest

from tests.cluster.ray_start import FVAE_DIST, RAY, ray_cluster
from tests.toy_dataset import tiny_overrides

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
EPOCHS = 2


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_training_submitted_with_fvae_dist_submit_runs_on_the_cluster(tmp_path, toy_dir):
    storage = tmp_path / "runs"  # absolute: the job's relative paths would land in Ray's copy of the repo
    run_dir = storage / "job"
    with ray_cluster(tmp_path) as cluster:
        cluster.start_head(num_cpus=2)
        started = time.monotonic()
        with open(tmp_path / "submit.log", "wb") as out:
            submit = subprocess.Popen(
                [str(FVAE_DIST), "submit", "--address", cluster.dashboard_url, "train",
                 *tiny_overrides(toy_dir, storage, "job", f"train.epochs={EPOCHS}", "train.cpu_kernels=off")],
                stdout=out, stderr=subprocess.STDOUT, env=cluster.client_env(), cwd=tmp_path)
        try:
            exposed = _sockets_not_on_loopback_while_training(cluster, submit)
            returncode = submit.wait(timeout=600)
        finally:
            if submit.poll() is None:
                submit.kill()
        output = (tmp_path / "submit.log").read_text()
        print(f"\njob submitted and finished in {time.monotonic() - started:.0f} s")
        left_after_stop = _processes_left_by_a_stopped_job(cluster, tmp_path, toy_dir, storage)

    assert returncode == 0, output[-4000:]
    job_id = re.search(r"^submitted job (\S+) to ", output, re.MULTILINE).group(1)
    assert f"job {job_id} SUCCEEDED" in output
    assert not exposed, exposed

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_completed"] == EPOCHS
    assert [row["epoch"] for row in metrics["history"]] == list(range(EPOCHS))
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert list(run_dir.glob("checkpoint_epoch*"))

    assert "multiple active Ray instances" not in output
    token = cluster.token.encode()
    assert token not in output.encode()
    assert not [path for path in run_dir.rglob("*") if path.is_file() and token in path.read_bytes()]
    assert not left_after_stop, left_after_stop


# the processes a training adds to a cluster: its driver, Ray Train's and Ray Data's actors
JOB_PROCESSES = ("fvae-dist", "fvae_dist", "RayTrainWorker", "TrainController", "PlacementGroupCleaner",
                 "SplitCoordinator", "BatchFeeder", "DatasetManager")


def _processes_left_by_a_stopped_job(cluster, tmp_path, toy_dir, storage, timeout_s: float = 180) -> list[str]:
    """Submit a long training, stop it with `ray job stop` once its workers train, and return
    what is still running of it `timeout_s` later ([] as soon as nothing is)."""
    log = tmp_path / "stopped.log"
    with open(log, "wb") as out:
        submit = subprocess.Popen(
            [str(FVAE_DIST), "submit", "--address", cluster.dashboard_url, "train",
             *tiny_overrides(toy_dir, storage, "stopped", "train.epochs=50", "train.cpu_kernels=off")],
            stdout=out, stderr=subprocess.STDOUT, env=cluster.client_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 600
        while not any("RayTrainWorker" in _name(p) for p in cluster.processes()):
            assert submit.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(2)
        job_id = re.search(r"^submitted job (\S+) to ", log.read_text(), re.MULTILINE).group(1)
        subprocess.run([str(RAY), "job", "stop", "--address", cluster.dashboard_url, job_id],
                       env={**cluster.client_env(), "RAY_AUTH_MODE": "token"}, check=True, timeout=120,
                       capture_output=True)
        stopped = time.monotonic()
        while True:
            left = sorted({_name(p)[:100] for p in cluster.processes()
                           if any(marker in _name(p) for marker in JOB_PROCESSES)})
            if not left or time.monotonic() - stopped > timeout_s:
                print(f"{len(left)} process(es) of the stopped job left {time.monotonic() - stopped:.0f} s after "
                      "`ray job stop`")
                return left
            time.sleep(2)
    finally:
        if submit.poll() is None:
            submit.kill()


def _sockets_not_on_loopback_while_training(cluster, submit) -> list:
    """Once the job's Train workers run: the listening sockets of the cluster's processes that
    are not on loopback (printed, all of them)."""
    deadline = time.monotonic() + 600
    while submit.poll() is None and time.monotonic() < deadline:
        processes = cluster.processes()
        names = " ".join(_name(p) for p in processes)
        if "RayTrainWorker" in names and "SplitCoordinator" in names:
            break
        time.sleep(2)
    listening = []
    for process in cluster.processes():
        try:
            listening += [(_name(process)[:80], c.laddr.ip, c.laddr.port) for c in process.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    print("\nlistening sockets of the cluster while the job trains:")
    for name, ip, port in sorted(listening):
        print(f"  {ip}:{port:<6d} {name}")
    assert any("RayTrainWorker" in name for name, _, _ in listening), "the job's workers were not seen"
    return [entry for entry in listening if entry[1] not in LOOPBACK]


def _name(process: psutil.Process) -> str:
    try:
        return f"{process.name()}: {' '.join(process.cmdline())}"
    except psutil.Error:
        return ""
