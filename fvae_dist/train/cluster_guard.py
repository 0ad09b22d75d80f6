"""Ends the processes of a local Ray cluster when the command that started it ends, however it ends.

Ray ties gcs_server and the raylet to the driver (the kernel kills them when the driver dies),
and the workers end with their raylet; but when the driver is killed outright (SIGKILL, the OOM
killer), the raylet's agents (DashboardAgent, RuntimeEnvAgent) notice that their raylet is gone
and then wait on the dead GCS for about a minute before they exit (Ray 2.60). The guard ends them
at once:

    with guarded_start():       around ray.init: the processes it starts (this process's
        ray.init(...)           descendants born meanwhile) are handed to a guard process
    end_processes(processes)    SIGTERM, then SIGKILL what is left after GRACE_S

The guard is a small process in a session of its own (a Ctrl+C in the terminal does not reach
it) that reads a pipe whose other end only the driver holds: first the processes to watch, as
"pid start-time" lines; then end of file, which means the driver has exited, by any means. It
ends those of them still running (the same pid and start time: not a process that reused the
pid), and exits. Processes are named by pid because Ray's rename themselves (ray::IDLE,
ray::DashboardAgent), which overwrites what /proc shows of their command line and environment.
"""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import psutil

GRACE_S = 5.0

# The running guards: their stdin pipes stay open exactly as long as this process.
_guards: list[subprocess.Popen] = []


@contextmanager
def guarded_start() -> Iterator[None]:
    """The processes this process starts inside the block, and theirs, end when it exits."""
    guard = subprocess.Popen(
        [sys.executable, "-m", "fvae_dist.train.cluster_guard"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives the driver's process group (Ctrl+C, a shell's kill)
    )
    _guards.append(guard)
    since = psutil.Process(guard.pid).create_time()
    try:
        yield
    finally:
        watched = [p for p in _descendants_born_since(since) if p.pid != guard.pid]
        guard.stdin.write("".join(f"{p.pid} {p.create_time()!r}\n" for p in watched).encode())
        guard.stdin.flush()


def end_processes(processes: Iterable[psutil.Process], grace_s: float = GRACE_S) -> None:
    """SIGTERM each process, SIGKILL those still alive after grace_s."""
    processes = list(processes)
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def _descendants_born_since(since: float) -> Iterator[psutil.Process]:
    for process in psutil.Process().children(recursive=True):
        try:
            if process.create_time() >= since:
                yield process
        except psutil.Error:  # already gone
            continue


def _still_running(lines: Iterable[str]) -> Iterator[psutil.Process]:
    for line in lines:
        pid, started = line.split()
        try:
            process = psutil.Process(int(pid))
            if abs(process.create_time() - float(started)) < 0.01:
                yield process
        except psutil.Error:
            continue


def _guard() -> None:
    watched = sys.stdin.read()  # returns at end of file: the driver has exited
    end_processes(_still_running(watched.splitlines()))


if __name__ == "__main__":
    _guard()
