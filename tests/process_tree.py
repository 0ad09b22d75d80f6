"""Stop a command a test started, with every process it started (its local Ray cluster), by pid."""
from __future__ import annotations

import signal
import subprocess

import psutil


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the command and its descendants (no-op for what already ended); never by name."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    members = family if process.poll() is not None else [psutil.Process(process.pid), *family]
    for member in members:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)
