"""The allocator settings of training workers (train/cpu_memory.py) keep a worker thread's big
per-step buffers mapped: a thread reallocating them does not page-fault on every pass."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from fvae_dist.train.cpu_memory import WORKER_ENV_VARS, minor_faults_this_thread

# A "step" in a thread other than the main one (where Ray Train runs the training function):
# allocate six 16 MiB tensors (more than one 64 MiB secondary-arena heap), write them, free them.
STEPS_IN_A_THREAD = r"""
import json, threading
import torch
from fvae_dist.train.cpu_memory import keep_freed_memory, minor_faults_this_thread
torch.set_num_threads(1)
keep_freed_memory()
result = {}
def one_step():
    buffers = [torch.empty(4 << 20) for _ in range(6)]
    for b in buffers:
        b.fill_(1.0)
    del buffers
def steps():
    for _ in range(10):  # until the heap has grown to the steps' size
        one_step()
    before = minor_faults_this_thread()
    for _ in range(10):
        one_step()
    result["faults_per_step"] = (minor_faults_this_thread() - before) / 10
thread = threading.Thread(target=steps)
thread.start()
thread.join()
print(json.dumps(result))
"""
PAGES_PER_STEP = 6 * (16 << 20) // 4096


def _faults_per_step(extra_env: dict) -> float:
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENV_VARS}
    env.update(extra_env)
    done = subprocess.run([sys.executable, "-c", STEPS_IN_A_THREAD], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["faults_per_step"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the arena behaviour and its fix are glibc's (Linux)")
@pytest.mark.timeout(240)
def test_worker_environment_keeps_a_threads_buffers_mapped():
    default = _faults_per_step({})
    worker = _faults_per_step(WORKER_ENV_VARS)
    # without the setting the thread's arena unmaps a heap and faults its pages in again each
    # step (measured: 6,144 faults a step, a quarter of the pages, every time)
    assert default > 0.1 * PAGES_PER_STEP, default
    assert worker < 0.02 * PAGES_PER_STEP, worker


def test_minor_faults_this_thread_counts_this_threads_faults():
    import mmap

    before = minor_faults_this_thread()
    fresh = mmap.mmap(-1, 8 << 20)  # 8 MiB of fresh anonymous pages (not from the heap)
    for offset in range(0, len(fresh), 4096):
        fresh[offset] = 1
    faults = minor_faults_this_thread() - before
    fresh.close()
    assert faults >= 0.9 * (8 << 20) / 4096 or not sys.platform.startswith("linux"), faults


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity to share one CPU")
def test_preemptions_this_thread_counts_losing_the_cpu_to_another_process():
    import threading
    import time

    from fvae_dist.train.cpu_memory import preemptions_this_thread

    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\n"
                            "t = time.time()\nwhile time.time() - t < 30: pass"])
    counted = {}

    def spin_beside_it():
        os.sched_setaffinity(0, {cpu})
        before = preemptions_this_thread()
        t = time.time()
        while time.time() - t < 1.0:
            pass
        counted["preemptions"] = preemptions_this_thread() - before

    try:
        time.sleep(0.3)  # the hog is running on `cpu`
        thread = threading.Thread(target=spin_beside_it)
        thread.start()
        thread.join()
    finally:
        hog.kill()
        hog.wait()
    # two busy threads on one CPU: the scheduler switches between them every few milliseconds
    assert counted["preemptions"] >= 10, counted
