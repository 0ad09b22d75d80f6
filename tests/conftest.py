"""Shared test fixtures: where the real data lives, and small synthetic data sets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the repository; FVAE_SHARED_DIR points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("FVAE_SHARED_DIR") or REPO_ROOT / ".." / "shared").resolve()
CSI300_DIR = SHARED / "data" / "cn_csi300"
REFERENCE_DIR = SHARED / "reference"


@pytest.fixture(scope="session")
def csi300_dir() -> Path:
    if not (CSI300_DIR / "stocks_daily.parquet").is_file():
        pytest.skip(f"real CSI300 data not found at {CSI300_DIR} (expected ../shared beside the repository)")
    return CSI300_DIR


@pytest.fixture(scope="module")
def fvae_ray():
    """A 2-CPU local Ray cluster started as `fvae-dist` starts its own (train.trainer.ensure_ray:
    with the dashboard, whose State API frees the CPUs of a Train run whose controller died).
    A cluster an earlier test module left running is shut down first."""
    import ray

    from fvae_dist.config import load_config
    from fvae_dist.train.trainer import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(load_config(None, ["ray.num_cpus=2"]))
    yield ray
    ray.shutdown()
