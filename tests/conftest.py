"""Shared test fixtures: where the real data lives, and small synthetic data sets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.toy_dataset import write_toy_dataset

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


def pytest_addoption(parser):
    parser.addoption("--cpu-kernels", default="auto", choices=("auto", "off"),
                     help="train.cpu_kernels for the training tests' runs (make test runs them once with off)")


def pytest_configure(config):
    import tests.toy_dataset as toy

    toy.CPU_KERNELS = config.getoption("--cpu-kernels")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device
    (scripts/gpu_check.sh runs them on a GPU machine)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} ({build}) sees none")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """Ray with 2 CPUs, as on the target laptop: 2 workers x 0.5 CPU leave 1 CPU to Ray Data."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "dataset")
