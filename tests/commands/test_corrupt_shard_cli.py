"""`fvae-dist train` and `fvae-dist predict` on a data set with a damaged shard: one line on
stderr naming the shard and what is wrong, no traceback (each command in a subprocess, as a
user runs it; the readers themselves: tests/data/test_corrupt_shard.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fvae_dist.data.shards import load_manifest, shard_entries
from tests.data.test_corrupt_shard import corrupt_middle, truncate
from tests.toy_dataset import tiny_overrides, write_toy_dataset

REPO = Path(__file__).resolve().parents[2]


def fvae_dist(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "fvae_dist.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def train_args(dataset: Path, storage: Path, run: str) -> list[str]:
    return ["train", *tiny_overrides(dataset, storage, run, "train.epochs=1", "ray.num_cpus=2")]


def assert_one_error_line(done: subprocess.CompletedProcess, command: str, shard: Path, *words: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"fvae-dist {command}: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"error: {shard}: " in errors[0], errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def damaged_copy(source: Path, target: Path, split: str, damage) -> Path:
    """A copy of the toy data set with the first shard of `split` damaged; returns that shard."""
    shutil.copytree(source, target)
    shard = target / shard_entries(load_manifest(target), split)[0]["path"]
    damage(shard)
    return shard


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("corrupt") / "dataset")


@pytest.mark.timeout(300)
def test_train_refuses_a_truncated_shard_before_ray_starts(toy, tmp_path):
    shard = damaged_copy(toy, tmp_path / "data", "valid", truncate)
    done = fvae_dist(*train_args(tmp_path / "data", tmp_path / "runs", "truncated"), timeout=240)
    assert_one_error_line(done, "train", shard, "not a readable Parquet file", "truncated")
    assert "Started a local Ray instance" not in done.stderr


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_train_names_a_shard_that_fails_inside_a_ray_data_task(toy, tmp_path):
    """The footer is intact, so the shard passes the check before Ray starts; reading its data
    fails in a Ray Data task, and the error reaches the driver wrapped by Ray."""
    shard = damaged_copy(toy, tmp_path / "data", "train", corrupt_middle)
    done = fvae_dist(*train_args(tmp_path / "data", tmp_path / "runs", "corrupt"), timeout=540)
    assert_one_error_line(done, "train", shard, "not a readable Parquet file")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_predict_names_a_truncated_shard(toy, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy, data)
    trained = fvae_dist(*train_args(data, tmp_path / "runs", "intact"), "data.test_split=none", timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    shard = data / shard_entries(load_manifest(data), "test")[0]["path"]
    truncate(shard)
    done = fvae_dist("predict", "--run", str(tmp_path / "runs" / "intact"), "--split", "test", timeout=240)
    assert_one_error_line(done, "predict", shard, "not a readable Parquet file")
