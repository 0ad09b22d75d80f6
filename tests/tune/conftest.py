"""Fixtures for the runner's tests: the toy data set and a small campaign on it, and helpers to
run `fvae-dist` in a subprocess that a test can interrupt."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.toy_dataset import write_toy_dataset

REPO = Path(__file__).resolve().parents[2]
TOY_MODEL = {"model.num_features": 4, "model.seq_len": 5}


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("tune_toy") / "dataset")


def campaign(tmp_path: Path, toy_dir: Path, **tune) -> dict:
    """A small, valid campaign on the toy data set (plain data, as read from YAML)."""
    return {
        "base": {"overrides": {"data.dataset_dir": str(toy_dir), **TOY_MODEL, "model.hidden_size": 8,
                               "train.epochs": 2, "train.early_stopping_patience": 0, "ray.num_cpus": 2}},
        "space": {
            "model.num_factors": {"type": "int", "low": 2, "high": 4},
            "model.num_portfolios": {"type": "int", "low": 4, "high": 16, "log": True},
            "model.hidden_size": {"type": "choice", "values": [8, 16]},
            "model.gamma": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
            "train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
        },
        "tune": {"name": "exp", "storage_path": str(tmp_path / "tune"), "num_samples": 3, "seed": 0,
                 "max_concurrent_trials": 1,
                 "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "driver_cpus": 0.05}, **tune},
    }


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """`fvae-dist ARGS` in its own process group (so that a test can interrupt it and its Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_DEDUP_LOGS="0")
    return subprocess.Popen([sys.executable, "-m", "fvae_dist.cli", *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(process: subprocess.Popen, timeout: float) -> int:
    """The process's exit code; killed (its own process group only) when it overruns `timeout`."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
