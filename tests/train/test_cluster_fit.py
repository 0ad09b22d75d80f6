"""train/cluster_fit.py: one rule for `fvae-dist train`, campaigns and grids: all running
trainings together leave Ray Data a CPU."""
from __future__ import annotations

import pytest

from fvae_dist.config import load_config
from fvae_dist.errors import ConfigError
from fvae_dist.train.cluster_fit import RunShape, check_fits


def test_runs_fit_with_one_cpu_left_to_ray_data():
    run = RunShape.of(load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=0.5"]))
    assert check_fits(run, [{"CPU": 2.0}]) == 1
    assert check_fits(run, [{"CPU": 4.0}]) == 3
    assert check_fits(run, [{"CPU": 8.0}, {"CPU": 8.0}]) == 15  # today: the cluster's totals
    trial = RunShape(1, 0.45, driver_cpus=0.05, settings="tune.resources.", unit="trial")
    assert check_fits(trial, [{"CPU": 2.0}]) == 2


def test_a_run_that_would_starve_ray_data_is_refused_with_what_to_change():
    # the configuration that hangs forever on 2 CPUs: the workers take both, Ray Data gets none
    hangs = RunShape.of(load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=1"]))
    with pytest.raises(ConfigError, match=r"one run needs 2 CPUs \(ray.num_workers=2 x ray.cpus_per_worker=1\), "
                                          r"but the Ray cluster has 2 and Ray Data needs 1 free; "
                                          r"use ray.cpus_per_worker=0.5"):
        check_fits(hangs, [{"CPU": 2.0}])
    with pytest.raises(ConfigError, match="too small"):
        check_fits(hangs, [{"CPU": 1.0}])
    trial = RunShape(1, 0.5, driver_cpus=0.05, settings="tune.resources.", unit="trial")
    with pytest.raises(ConfigError, match=r"one trial needs 0.55 CPUs .*tune.resources.driver_cpus=0.05"):
        check_fits(trial, [{"CPU": 1.0}])


def test_gpus_limit_how_many_fit():
    gpu = RunShape.of(load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=1", "ray.use_gpu=true"]))
    with pytest.raises(ConfigError, match=r"one run needs 2 GPUs \(ray.num_workers=2 with ray.use_gpu=true\), "
                                          r"but the Ray cluster has 1"):
        check_fits(gpu, [{"CPU": 64.0, "GPU": 1.0}])
    assert check_fits(gpu, [{"CPU": 64.0, "GPU": 5.0}]) == 2
