"""train/thread_stats.py: the training thread's page-fault and preemption counters."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fvae_dist.train.thread_stats import minor_faults_this_thread, preemptions_this_thread


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
