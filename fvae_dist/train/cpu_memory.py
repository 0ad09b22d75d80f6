"""Keep freed memory inside the process on CPU training workers.

    keep_freed_memory() -> bool      call once per process, before training; True if applied
    WORKER_ENV_VARS                  environment of every Ray Train worker (trainer.py)
    minor_faults_this_thread() -> int   page faults of the calling thread so far (a diagnostic)
    preemptions_this_thread() -> int    times the scheduler took the CPU from the calling thread

A training step allocates and frees the same tensors every step, some of them megabytes large
(activations of all T*S GRU rows). glibc serves blocks above its mmap threshold with fresh mmap'd
pages and returns them to the kernel on free, so each step pays one page fault per 4 KiB touched:
500-1,000 faults per 300-stock FactorVAE step, about 2% of its time, measured on one core.
Raising the mmap and trim thresholds makes glibc recycle those blocks from its heap instead (0-20
faults per step). The cost is that a worker keeps up to TRIM_THRESHOLD of freed memory mapped.
Linux/glibc only; elsewhere it does nothing.

The thresholds only hold in glibc's main arena. Ray Train runs the training function in a
thread of the worker actor, next to Ray's own threads, and glibc gives such a thread one of up
to 8 x cores secondary arenas, or the main one, depending on which threads first allocated. A
secondary arena grows in 64 MiB heaps and unmaps a heap as soon as it is empty, whatever the trim
threshold, so a step whose tensors overflow one heap maps fresh pages and faults on every one of
them, every step. Measured on one core, fp32, 4 days per step (about 1,000 stocks): of 12 runs
of the same command, 7 landed in that mode (52-57 ms a step; 5,600-9,700 faults a step where
counted) and 5 did not (45-47 ms; 3-40 faults). MALLOC_ARENA_MAX=1, which glibc reads at
process start, puts every thread in the main arena: 8 runs of 8 at 45-48 ms, 0-74 faults a
step. Ray's own threads allocate little, so sharing one arena costs them nothing measurable.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

MMAP_THRESHOLD = 64 << 20   # blocks below this come from the heap, not from fresh mmap'd pages
TRIM_THRESHOLD = 1 << 30    # free heap memory kept mapped before glibc returns it to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h

# Set through the trainer's worker runtime_env: glibc reads it when the worker process starts,
# before any thread exists, which no call made from inside the worker could do.
WORKER_ENV_VARS = {"MALLOC_ARENA_MAX": "1"}

_applied = False


def keep_freed_memory() -> bool:
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def minor_faults_this_thread() -> int:
    """Minor page faults of the calling thread since it started (0 where Linux's per-thread
    usage is unavailable)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return resource.getrusage(who).ru_minflt if who is not None else 0


def preemptions_this_thread() -> int:
    """Involuntary context switches of the calling thread since it started: other threads or
    processes took its CPU while it could have run (0 where per-thread usage is unavailable).
    A diagnostic of neighbours on the training core (train/core_layout.py)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return resource.getrusage(who).ru_nivcsw if who is not None else 0
