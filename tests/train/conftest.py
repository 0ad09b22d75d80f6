"""Fixtures for the training tests: one small local Ray instance and a toy data set."""
from __future__ import annotations

import pytest

from tests.train.toy_dataset import write_toy_dataset

# A model small enough that Ray's own start-up dominates a test run.
TINY_MODEL = ["model.num_features=4", "model.seq_len=5", "model.hidden_size=8", "model.num_factors=2",
              "model.num_portfolios=4"]


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


def tiny_overrides(dataset_dir, storage, run_name, *extra):
    return [f"data.dataset_dir={dataset_dir}", f"ray.storage_path={storage}", f"ray.run_name={run_name}",
            *TINY_MODEL, *extra]
