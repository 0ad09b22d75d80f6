"""Training threads on cores of their own, Ray's other processes on the rest (train/core_layout.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from fvae_dist.train import core_layout
from fvae_dist.train.core_layout import CoreLayout, plan_core_layout

REPO = Path(__file__).resolve().parents[2]

needs_two_cpus = pytest.mark.skipif(
    not core_layout.affinity_supported() or len(core_layout.available_cpus()) < 2,
    reason="pinning needs CPU affinity (Linux) and at least 2 CPUs to tell a pinned thread from an unpinned one",
)


def test_one_worker_on_two_cpus_takes_the_last_and_leaves_the_first():
    assert plan_core_layout(1, 1, [0, 1]) == CoreLayout(training=((1,),), housekeeping=(0,))


def test_workers_get_disjoint_cores_of_their_own():
    layout = plan_core_layout(2, 2, range(8))
    assert layout.training == ((4, 5), (6, 7))
    assert layout.housekeeping == (0, 1, 2, 3)


def test_gaps_in_the_allowed_cpus_are_respected():
    # e.g. taskset -c 2,5,7,9: only those CPUs may be used
    layout = plan_core_layout(2, 1, [9, 2, 7, 5])
    assert layout.training == ((7,), (9,))
    assert layout.housekeeping == (2, 5)


@pytest.mark.parametrize("workers, threads, cpus", [(2, 1, 2), (1, 2, 2), (1, 1, 1), (3, 1, 3)])
def test_nothing_is_pinned_without_a_core_left_for_everything_else(workers, threads, cpus):
    assert plan_core_layout(workers, threads, range(cpus)) is None


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="workers and threads_per_worker"):
        plan_core_layout(0, 1, range(4))


def _in_a_thread(fn):
    """Run fn in a fresh thread (affinity is per thread on Linux) and return its result."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()))
    thread.start()
    thread.join()
    return box["value"]


@needs_two_cpus
def test_pinning_changes_only_the_calling_thread():
    cpus = core_layout.available_cpus()
    pinned = _in_a_thread(lambda: core_layout.pin_training_thread((cpus[-1],)))
    assert pinned == (cpus[-1],)
    assert core_layout.available_cpus() == cpus  # this thread untouched


@needs_two_cpus
def test_threads_a_pinned_training_thread_starts_leave_its_core(monkeypatch):
    from fvae_dist.data.stream import InBackground

    monkeypatch.setattr(core_layout, "_helper_cpus", None)
    cpus = core_layout.available_cpus()

    def pinned_then_start_threads():
        os.sched_setaffinity(0, {cpus[0]})  # as the worker process starts on a confined cluster
        core_layout.pin_training_thread((cpus[-1],))
        inherited = _in_a_thread(core_layout.available_cpus)
        helper = _in_a_thread(lambda: (core_layout.leave_training_cores(), core_layout.available_cpus())[1])
        stream = InBackground((core_layout.available_cpus() for _ in range(1)), depth=1)
        return inherited, helper, next(stream), core_layout.available_cpus()

    inherited, helper, background, training = _in_a_thread(pinned_then_start_threads)
    assert inherited == training == (cpus[-1],)  # what a new thread gets without the call
    assert helper == background == (cpus[0],)


def test_leaving_training_cores_changes_nothing_where_nothing_was_pinned(monkeypatch):
    monkeypatch.setattr(core_layout, "_helper_cpus", None)
    monkeypatch.delenv(core_layout.NODE_CPUS_ENV, raising=False)
    cpus = core_layout.available_cpus()

    def unpinned_then_start_a_thread():
        core_layout.pin_training_thread(None)
        return _in_a_thread(lambda: (core_layout.leave_training_cores(), core_layout.available_cpus())[1])

    assert _in_a_thread(unpinned_then_start_a_thread) == cpus


@needs_two_cpus
def test_a_worker_without_cores_of_its_own_widens_to_the_node_cpus_of_a_confined_cluster(monkeypatch):
    cpus = core_layout.available_cpus()
    monkeypatch.setenv(core_layout.NODE_CPUS_ENV, ",".join(map(str, cpus)))

    def confined_then_unpinned():
        os.sched_setaffinity(0, {cpus[0]})  # as inherited from a confined raylet
        return core_layout.pin_training_thread(None)

    assert _in_a_thread(confined_then_unpinned) == cpus


@needs_two_cpus
def test_outside_a_confined_cluster_an_unpinned_worker_keeps_its_cpus(monkeypatch):
    cpus = core_layout.available_cpus()
    monkeypatch.delenv(core_layout.NODE_CPUS_ENV, raising=False)

    def narrowed_then_unpinned():
        os.sched_setaffinity(0, {cpus[0]})  # e.g. a user's taskset: not ours to undo
        return core_layout.pin_training_thread(None)

    assert _in_a_thread(narrowed_then_unpinned) == (cpus[0],)


@needs_two_cpus
def test_processes_started_inside_the_block_inherit_the_confinement(monkeypatch):
    monkeypatch.delenv(core_layout.NODE_CPUS_ENV, raising=False)
    cpus = core_layout.available_cpus()
    probe = ("import json, os; print(json.dumps([sorted(os.sched_getaffinity(0)), os.environ.get(%r)]))"
             % core_layout.NODE_CPUS_ENV)

    def run_probe():
        return json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout)

    with core_layout.new_processes_confined_to([cpus[0]], cpus):
        inside = run_probe()
    after = run_probe()
    assert inside == [[cpus[0]], ",".join(map(str, cpus))]
    assert after == [list(cpus), None]
    assert core_layout.available_cpus() == cpus  # the calling thread is restored
    assert core_layout.NODE_CPUS_ENV not in os.environ


# A whole `fvae-dist train` run in a fresh process (the test session's own Ray cluster is not
# one that train() started): 1 worker on 2 CPUs is pinned to CPU 1, Ray's other processes run on
# CPU 0, the run's metrics say where the training thread ran, and a run with more workers than
# cores of their own widens back to every CPU.
RUN = textwrap.dedent("""
    import json, os, sys
    import ray
    from fvae_dist.config import load_config
    from fvae_dist.train import trainer
    from tests.train.conftest import tiny_overrides
    from tests.train.toy_dataset import write_toy_dataset

    work = sys.argv[1]
    data = write_toy_dataset(os.path.join(work, "data"))
    base = tiny_overrides(data, os.path.join(work, "runs"), "pinned", "train.epochs=1", "ray.num_cpus=2",
                          "ray.num_workers=1", "ray.cpus_per_worker=1", "train.torch_threads=1")
    cfg = load_config(None, base)
    outcome = trainer.train(cfg)

    @ray.remote(num_cpus=0)
    def housekeeping():
        return sorted(os.sched_getaffinity(0)), os.environ.get("FVAE_DIST_NODE_CPUS")

    two = load_config(None, base[:-3] + ["ray.run_name=two", "ray.num_workers=2", "ray.cpus_per_worker=0.5"])
    print("RESULT", json.dumps({
        "trained_on": outcome.metrics["history"][-1]["perf_training_cpus"],
        "preemptions": outcome.metrics["history"][-1]["perf_preemptions_per_step"],
        "housekeeping": ray.get(housekeeping.remote()),
        "driver": sorted(os.sched_getaffinity(0)),
        "cores_for_two_workers": trainer.training_cores_for(two),
        "two_trained_on": trainer.train(two).metrics["history"][-1]["perf_training_cpus"],
    }))
    ray.shutdown()
""")


@needs_two_cpus
def test_train_pins_one_worker_and_confines_the_rest_of_its_local_cluster(tmp_path):
    if core_layout.available_cpus() != (0, 1):
        pytest.skip(f"written for the 2-CPU target machine; this one allows CPUs {core_layout.available_cpus()}")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", core_layout.NODE_CPUS_ENV)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], capture_output=True, text=True,
                            timeout=400, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training threads on CPU 1" in result.stdout
    report = json.loads(result.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert report["trained_on"] == "1"
    assert report["preemptions"] >= 0
    assert report["housekeeping"] == [[0], "0,1"]
    assert report["driver"] == [0, 1]
    assert report["cores_for_two_workers"] is None
    assert report["two_trained_on"] == "0,1"  # widened back from the confined CPU 0
