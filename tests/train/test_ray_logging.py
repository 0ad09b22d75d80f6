"""The local cluster's workers silence the PlacementGroupCleaner's unanswerable State API checks
(train/ray_logging.py), and nothing else."""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import subprocess
import sys
import textwrap

from fvae_dist.train import ray_logging


def test_the_silenced_logger_is_the_one_that_logs_the_failed_checks():
    # a Ray upgrade that moves or renames the cleaner must fail here, not silently spam again
    module = importlib.import_module(ray_logging.PLACEMENT_GROUP_CLEANER_LOGGER)
    assert module.logger.name == ray_logging.PLACEMENT_GROUP_CLEANER_LOGGER
    assert "State API may be temporarily unavailable" in inspect.getsource(module)


def test_hook_limits_only_the_cleaner_to_errors():
    cleaner = logging.getLogger(ray_logging.PLACEMENT_GROUP_CLEANER_LOGGER)
    before = cleaner.level
    try:
        ray_logging.quiet_unanswerable_checks()
        assert cleaner.getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("ray.train").getEffectiveLevel() < logging.ERROR
    finally:
        cleaner.setLevel(before)


PROBE = textwrap.dedent("""
    import logging, ray
    from fvae_dist.config import load_config
    from fvae_dist.train import ray_logging
    from fvae_dist.train.trainer import ensure_ray

    ensure_ray(load_config(None, ["ray.num_cpus=1"]))

    @ray.remote(num_cpus=0)
    class Probe:
        def level(self):
            return logging.getLogger(ray_logging.PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel()

    @ray.remote(num_cpus=0)
    class Controller:  # Ray Train's controller starts the cleaner as a detached actor
        def detached_probe_level(self):
            return ray.get(Probe.options(lifetime="detached").remote().level.remote())

    print("LEVEL", ray.get(Controller.remote().detached_probe_level.remote()))
    ray.shutdown()
""")


def test_local_cluster_started_by_ensure_ray_runs_the_hook_in_detached_actors():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180,
                            env=_environ_without_ray_address())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"LEVEL {logging.ERROR}" in result.stdout, result.stdout[-2000:]


def _environ_without_ray_address() -> dict[str, str]:
    # RAY_ADDRESS would make ensure_ray join that cluster instead of starting the local one
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
