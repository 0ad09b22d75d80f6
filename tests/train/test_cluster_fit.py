"""train/cluster_fit.py: one rule for `fvae-dist train`, campaigns and grids: placed node by node
as Ray places them, all running trainings leave one node a CPU for Ray Data."""
from __future__ import annotations

import pytest

from fvae_dist.config import load_config
from fvae_dist.errors import ConfigError
from fvae_dist.train.cluster_fit import RunShape, check_fits


def shape(*overrides: str) -> RunShape:
    return RunShape.of(load_config(None, list(overrides)))


def test_runs_fit_with_one_cpu_left_to_ray_data():
    run = shape("ray.num_workers=2", "ray.cpus_per_worker=0.5")
    assert check_fits(run, [{"CPU": 2.0}]) == 1
    assert check_fits(run, [{"CPU": 4.0}]) == 3
    # 8 runs fill one node, 7 the other: it keeps its CPU for Ray Data
    assert check_fits(run, [{"CPU": 8.0}, {"CPU": 8.0}]) == 15
    trial = RunShape(1, 0.45, driver_cpus=0.05, settings="tune.resources.", unit="trial")
    assert check_fits(trial, [{"CPU": 2.0}]) == 2


def test_a_run_that_would_starve_ray_data_is_refused_with_what_to_change():
    # the configuration that hangs forever on 2 CPUs: the workers take both, Ray Data gets none
    hangs = shape("ray.num_workers=2", "ray.cpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"^one run needs 2 CPUs \(ray.num_workers=2 x ray.cpus_per_worker=1\), "
                                          r"but the Ray cluster has 2 and Ray Data needs 1 free \(reading the "
                                          r"train, valid and test days\); use ray.cpus_per_worker=0.5 or fewer"):
        check_fits(hangs, [{"CPU": 2.0}])
    with pytest.raises(ConfigError, match="too small: use a machine with at least 2 CPUs"):
        check_fits(hangs, [{"CPU": 1.0}])
    trial = RunShape(1, 0.5, driver_cpus=0.05, settings="tune.resources.", unit="trial")
    with pytest.raises(ConfigError, match=r"one trial needs 0.55 CPUs .*tune.resources.driver_cpus=0.05"):
        check_fits(trial, [{"CPU": 1.0}])


def test_ray_data_needs_its_cpu_on_one_node_not_spread_over_several():
    # The run that trained 3 epochs and then hung at the test pass: one worker on each 2-CPU node
    # leaves 0.5 + 0.5 CPUs, enough by the totals, but Ray Data's task needs 1 on one node.
    spread = shape("ray.num_workers=2", "ray.cpus_per_worker=1.5")
    two_nodes = [{"CPU": 2.0, "memory": 8e9}, {"CPU": 2.0, "memory": 8e9, "node2": 1.0}]
    with pytest.raises(ConfigError, match=r"^one run needs 3 CPUs \(ray.num_workers=2 x ray.cpus_per_worker=1.5\); "
                                          r"the Ray cluster's 2 nodes have 2 CPUs each, and with its workers placed "
                                          r"on them no node keeps the 1 CPU that Ray Data needs for reading the train, "
                                          r"valid and test days \(at most 0.5 left on one node\); "
                                          r"use ray.cpus_per_worker=1 or fewer workers"):
        check_fits(spread, two_nodes)
    # Ray packs 2 x 1 CPU onto one node: the other keeps both of its CPUs
    assert check_fits(shape("ray.num_workers=2", "ray.cpus_per_worker=1"), two_nodes) == 1
    # one worker per 3-CPU node (two do not fit on one), each node keeps 1: the two-node test's run
    assert check_fits(shape("ray.num_workers=2", "ray.cpus_per_worker=2"), [{"CPU": 3.0}, {"CPU": 3.0}]) == 1
    # a worker larger than any node
    with pytest.raises(ConfigError, match=r"its workers do not fit on the nodes: the Ray cluster's 2 nodes have 2, "
                                          r"1 CPUs; use ray.cpus_per_worker=1 or fewer workers"):
        check_fits(shape("ray.num_workers=2", "ray.cpus_per_worker=2.5"), [{"CPU": 2.0}, {"CPU": 1.0}])


def test_gpus_limit_how_many_fit():
    gpu = shape("ray.num_workers=2", "ray.cpus_per_worker=1", "ray.use_gpu=true")
    with pytest.raises(ConfigError, match=r"one run needs 2 GPUs \(ray.num_workers=2 with ray.use_gpu=true\), "
                                          r"but the Ray cluster has 1"):
        check_fits(gpu, [{"CPU": 64.0, "GPU": 1.0}])
    assert check_fits(gpu, [{"CPU": 64.0, "GPU": 5.0}]) == 2
    # GPU workers go where the GPUs are; the CPU-only node keeps its CPUs for Ray Data
    assert check_fits(gpu, [{"CPU": 2.0, "GPU": 2.0}, {"CPU": 4.0}]) == 1
