"""The allocator path: glibc keeps the memory a training step frees inside the process.

    worker_env_vars() -> dict        set in every Ray Train worker's environment (trainer.py)
    keep_freed_memory() -> bool      call once per worker process, before training

A training step allocates and frees the same tensors every step, some of them megabytes large
(the activations of all S*T GRU rows). glibc serves blocks above its mmap threshold with fresh
mmap'd pages and returns them to the kernel on free, so every step pays one page fault per 4 KiB
it touches. Raising the mmap and trim thresholds makes glibc recycle those blocks from its heap.

The thresholds only hold in glibc's main arena. Ray Train runs the training function in a thread
of the worker actor, and glibc gives such a thread one of several secondary arenas, which grow
in 64 MiB heaps and unmap a heap as soon as it is empty, whatever the trim threshold: a step
whose tensors overflow one heap then faults on every page, every step. MALLOC_ARENA_MAX=1, read
by glibc at process start (hence an environment variable of the worker, not a call made inside
it), puts every thread in the main arena. The cost: a worker keeps up to TRIM_THRESHOLD of freed
memory mapped. Linux/glibc only; elsewhere nothing happens. Measured gain: docs/benchmarks.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 64 << 20   # blocks below this come from the heap, not from fresh mmap'd pages
TRIM_THRESHOLD = 1 << 30    # free heap memory kept mapped before glibc returns it to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h

_applied = False


def worker_env_vars() -> dict[str, str]:
    """Environment of every training worker process (glibc reads it before any thread exists)."""
    return {"MALLOC_ARENA_MAX": "1"}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process; True if applied."""
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
