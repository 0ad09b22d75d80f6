"""Per-thread counters of the training thread, reported in every epoch's perf_* metrics.

    minor_faults_this_thread() -> int    page faults: hundreds per step mean the allocator hands
                                         memory back to the kernel between steps (accel/memory.py)
    preemptions_this_thread() -> int     times the scheduler took the CPU from this thread while
                                         it could have run: neighbours competing for its core
Both are 0 where Linux's per-thread resource usage (RUSAGE_THREAD) is unavailable.
    peak_rss_mb() -> float               the worker process's peak resident memory so far
"""
from __future__ import annotations

import resource


def minor_faults_this_thread() -> int:
    who = getattr(resource, "RUSAGE_THREAD", None)
    return resource.getrusage(who).ru_minflt if who is not None else 0


def preemptions_this_thread() -> int:
    who = getattr(resource, "RUSAGE_THREAD", None)
    return resource.getrusage(who).ru_nivcsw if who is not None else 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
