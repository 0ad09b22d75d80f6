"""The allocator path (accel/memory.py) keeps a worker thread's big per-step buffers mapped: a
thread reallocating them does not page-fault on every pass."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from fvae_dist.accel.memory import worker_env_vars

WORKER_ENV_VARS = worker_env_vars()

# A "step" in a thread other than the main one (where Ray Train runs the training function):
# allocate six 16 MiB tensors (more than one 64 MiB secondary-arena heap), write them, free them.
STEPS_IN_A_THREAD = r"""
import json, threading
import torch
from fvae_dist.accel.memory import keep_freed_memory
from fvae_dist.train.thread_stats import minor_faults_this_thread
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
