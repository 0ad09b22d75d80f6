"""Logging settings for the Ray worker processes of a local cluster started by `fvae-dist`.

Ray Train V2 starts a PlacementGroupCleaner next to each run's controller. Once a second it asks
Ray's State API whether the controller is still alive, so that it can remove the run's placement
group if the controller dies without doing so itself. The State API is served by the dashboard,
which the local clusters started here leave out (ensure_ray: its processes would take memory and
CPU from two-core machines). Every one of those checks then fails and logs a warning, about
1,200 identical lines in a 20-minute run that bury the training progress. The check cannot
succeed, and the cleanup it guards is moot on a local cluster, which ends with the driver, so
its logger is limited to errors here. Clusters joined through ray.address keep Ray's defaults.
"""
from __future__ import annotations

import logging

PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

# the dotted path Ray imports in each worker process (runtime_env's worker_process_setup_hook)
WORKER_SETUP_HOOK = f"{__name__}.quiet_unanswerable_checks"


def quiet_unanswerable_checks() -> None:
    """Run in every worker process of the local cluster: only errors from the cleaner's checks."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
