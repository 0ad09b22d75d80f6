"""Training threads on cores of their own, Ray's other processes on the rest (local clusters only).

    layout = plan_core_layout(workers, threads_per_worker, available_cpus())   None if it does not fit
    with new_processes_confined_to(layout.housekeeping, available_cpus()):
        ray.init(...)                                                          the raylet and all it starts
    pin_training_thread(layout.training[rank])                                in each worker, first thing
    leave_training_cores()                                                    first thing in threads it starts
    cpu_list_text(available_cpus())                                           "0,1": where this thread runs

Why: a local Ray node runs dozens of threads besides the training workers: the raylet and its
object store I/O thread, the GCS, every actor's polling loop (the train controller, the Ray Data
coordinators, the feeders, about ten idle helper actors, each waking about 100 times a second).
Measured on 2 cores with 1 training worker (fp32, one day per step, 13 ms steps): the training
thread lost its CPU 5-7 times per step, spent 0.9 ms of every step runnable but not running, and
its own CPU time per step grew by 5% (caches refilled after each visit). With the thread pinned
to one core and everything else started on the other, back-to-back pairs gave 19.7K -> 20.9K and
18.2K -> 19.5K stock-days/s in fp32, 29.1K -> 37.6K in bf16 (3.8-3.9 preemptions per step).
With 8 days per Ray Data block (data/stream.py) the housekeeping got lighter and the pinned and
unpinned pairs came out even in fp32 (18.7K / 18.9K, 19.2K / 19.1K), until the threads the training
thread starts were moved off its core too (leave_training_cores): 3.8 -> 0.1 preemptions per step,
fp32 pairs 18.7K -> 20.2K, 20.8K -> 21.3K, 18.8K -> 19.1K. The
price: start-up and Ray Data's reading of the validation and test splits get fewer cores, so a
1-worker run on 2 cores has 3-7 s more fixed cost. See the README's benchmark section.

Only when it fits: every worker's threads need a core of their own and at least one core must
remain for everything else. With 2 workers on 2 cores there is no such core, and pinning each
worker to one of them measured the same as not pinning (25.8K and 26.2K against 24.6-25.9K), so
nothing is pinned then. A cluster that `ray.address` joins is never touched: its nodes are not
this machine, and their CPUs are someone else's to lay out.

The housekeeping processes inherit their CPU set from the thread that called `ray.init`, and so
does every worker the raylet starts later. `new_processes_confined_to` also leaves the node's full
CPU set in an environment variable (NODE_CPUS_ENV) that every process of that cluster inherits:
a training worker with no core of its own (a Tune trial, a later run on the same cluster with
more workers) widens its training thread back to that set instead of sharing the housekeeping
cores.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

NODE_CPUS_ENV = "FVAE_DIST_NODE_CPUS"
"""Set in the processes of a local cluster whose housekeeping was confined: the node's CPUs."""

_helper_cpus: tuple[int, ...] | None = None
"""In a worker whose training thread was pinned: the worker's CPUs from before, minus the training
cores. Threads the training thread starts belong there (leave_training_cores)."""


@dataclass(frozen=True)
class CoreLayout:
    training: tuple[tuple[int, ...], ...]
    """CPUs of each rank's training thread (and the intra-op threads it starts)."""
    housekeeping: tuple[int, ...]
    """CPUs of everything else on the node: raylet, GCS, Ray Data, feeders, helper actors."""

    def describe(self) -> str:
        cores = ", ".join(cpu_list_text(cpus) for cpus in self.training)
        return f"training threads on CPU {cores} (one entry per worker), Ray's other processes on CPU {cpu_list_text(self.housekeeping)}"


def affinity_supported() -> bool:
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def available_cpus() -> tuple[int, ...]:
    """The CPUs this thread may run on (taskset and cgroup limits included), ascending."""
    if not affinity_supported():
        return ()
    return tuple(sorted(os.sched_getaffinity(0)))


def plan_core_layout(workers: int, threads_per_worker: int, cpus: Sequence[int]) -> CoreLayout | None:
    """Each worker `threads_per_worker` CPUs of its own, taken from the end of `cpus` (the first
    CPUs tend to take more of the kernel's own interrupts), the rest for housekeeping; None when
    that leaves no CPU for housekeeping."""
    if workers < 1 or threads_per_worker < 1:
        raise ValueError(f"workers and threads_per_worker must be >= 1, got {workers} and {threads_per_worker}")
    cpus = tuple(sorted(set(cpus)))
    needed = workers * threads_per_worker
    if needed >= len(cpus):
        return None
    housekeeping, training = cpus[: len(cpus) - needed], cpus[len(cpus) - needed :]
    return CoreLayout(training=per_rank(training, workers, threads_per_worker), housekeeping=housekeeping)


def per_rank(cpus: Sequence[int], workers: int, threads_per_worker: int) -> tuple[tuple[int, ...], ...]:
    """`cpus` dealt out in order, `threads_per_worker` to each of `workers` ranks (enough assumed)."""
    return tuple(tuple(cpus[rank * threads_per_worker : (rank + 1) * threads_per_worker]) for rank in range(workers))


@contextlib.contextmanager
def new_processes_confined_to(cpus: Sequence[int], node_cpus: Sequence[int]) -> Iterator[None]:
    """Processes started inside the block (ray.init's raylet and GCS, and through them every Ray
    worker) run on `cpus` and carry NODE_CPUS_ENV=`node_cpus`. Only the calling thread's affinity
    changes (Linux sets it per thread), and it is restored on the way out."""
    before = os.sched_getaffinity(0)
    previous_env = os.environ.get(NODE_CPUS_ENV)
    os.environ[NODE_CPUS_ENV] = cpu_list_text(node_cpus)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        if previous_env is None:
            os.environ.pop(NODE_CPUS_ENV, None)
        else:
            os.environ[NODE_CPUS_ENV] = previous_env


def pin_training_thread(cores: Sequence[int] | None) -> tuple[int, ...] | None:
    """Run the calling thread on `cores`; without cores of its own, on the node's full CPU set
    when this process belongs to a confined cluster (NODE_CPUS_ENV), else leave it alone.
    Returns the thread's CPUs afterwards (None where affinity is not supported). Call it before
    torch starts its intra-op threads: they inherit the set of the thread that starts them."""
    global _helper_cpus
    if not affinity_supported():
        return None
    _helper_cpus = None
    if cores:
        training = set(cores)
        _helper_cpus = tuple(cpu for cpu in available_cpus() if cpu not in training) or None
    target = cores if cores else _parse_cpu_list(os.environ.get(NODE_CPUS_ENV, ""))
    if target:
        try:
            os.sched_setaffinity(0, set(target))
        except OSError:  # CPUs this process may not use (another cgroup): keep the inherited set
            pass
    return available_cpus()


def leave_training_cores() -> None:
    """Call first thing in a thread that a pinned training thread starts (the feeder's receiver,
    background batch readers): a new thread inherits its creator's CPUs, and on the training core
    it would take turns with the step. Measured with the feeder's receiver still on the training
    core: the pinned thread lost its CPU 3.7-3.8 times a step (1.5-2.9 unpinned); moved off,
    0.06-0.11 times. The thread moves to the CPUs the worker had before pinning; nothing happens
    where nothing was pinned."""
    if _helper_cpus and affinity_supported():
        try:
            os.sched_setaffinity(0, set(_helper_cpus))
        except OSError:  # CPUs this process may no longer use: stay where it is
            pass


def cpu_list_text(cpus: Sequence[int]) -> str:
    """CPUs as text, ascending: "0,2,3" (environment variable, run metrics, messages)."""
    return ",".join(str(cpu) for cpu in sorted(cpus))


def _parse_cpu_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())
