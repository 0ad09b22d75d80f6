"""A real S3-protocol server on loopback for the storage tests: moto's server (moto[server]),
started as its own process and stopped by its pid, with the environment a client needs.

    with s3_server() as s3:
        s3.env          AWS_* variables: endpoint, region, test credentials
        s3.make_bucket("runs")
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    process: subprocess.Popen

    def make_bucket(self, name: str) -> str:
        import pyarrow.fs as pafs

        with _environment(self.env):
            fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
            fs.create_dir(name)
        return f"s3://{name}"

    def filesystem(self):
        import pyarrow.fs as pafs

        with _environment(self.env):
            return pafs.FileSystem.from_uri("s3://any")[0]


@contextlib.contextmanager
def s3_server():
    executable = Path(sys.executable).with_name("moto_server")
    if not executable.is_file() and shutil.which("moto_server") is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]'); `make test` installs it")
    port = _free_port()
    process = subprocess.Popen([str(executable if executable.is_file() else "moto_server"), "-H", "127.0.0.1",
                                "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(endpoint, process)
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "fvae-test-key",
            "AWS_SECRET_ACCESS_KEY": "fvae-test-secret-not-for-logs",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        yield S3Server(endpoint, env, process)
    finally:
        process.kill()
        process.wait(timeout=30)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(endpoint: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}")
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout} s")
