"""Tune's own ASHAScheduler stops a trial by ending its actor; the CPUs of that trial's Train
run must come back (Ray Train's PlacementGroupCleaner, through the dashboard's State API), or
on 2 CPUs the next trial's Ray Data never gets one and the experiment hangs."""
from __future__ import annotations

import time

import pytest
import ray.tune

from fvae_dist.config import load_config
from fvae_dist.train.cluster_fit import RunShape
from fvae_dist.tune.campaign import CampaignPlan, asha
from fvae_dist.tune.results import read_metrics
from fvae_dist.tune.run import Experiment, run_experiment
from fvae_dist.tune.spec import EPOCHS_DONE
from tests.toy_dataset import TINY_MODEL
from tests.toy_dataset import write_toy_dataset

EPOCHS = 6


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_trial_asha_stops_gives_its_cpus_to_the_next_one(tmp_path, fvae_ray):
    # One trial at a time, each holding half the machine (0.95 CPU worker + 0.05 trial actor):
    # had the stopped trial kept its worker's CPU, the next one's workers would still be placed
    # and its Ray Data would wait forever for a free CPU (up to this test's timeout).
    # Tune ends a trial a moment after the verdict, while its Train run goes on: epochs long
    # enough (and enough of them) that the stop lands before the stopped trial could finish
    data = write_toy_dataset(tmp_path / "data", split_days={"train": 160, "valid": 16, "test": 8})
    base = load_config(None, [f"data.dataset_dir={data}", *TINY_MODEL, f"train.epochs={EPOCHS}",
                              "train.early_stopping_patience=0", "ray.num_workers=1", "ray.cpus_per_worker=0.95",
                              "ray.num_cpus=2"])
    folder = tmp_path / "asha"
    # the metric is the epoch's learning rate (constant schedule): ASHA's verdicts are then known
    # in advance. The 2nd trial is below the 1st at the first rung and is stopped; the 3rd is not.
    run = run_experiment(Experiment(
        name=folder.name, storage_path=tmp_path, plan=CampaignPlan(base, folder, "lr", "max"), cluster=base,
        trial_shape=RunShape.of(base, driver_cpus=0.05, unit="trial"), concurrency=lambda fit: 1,
        param_space={"train.lr": ray.tune.grid_search([1e-3, 1e-4, 2e-3])}, metric="lr", mode="max",
        scheduler=asha(EPOCHS_DONE, max_t=EPOCHS, grace_period=1, reduction_factor=2),
        trial_dirname=lambda trial: f"trial_{trial.trial_id}",
    ))
    by_lr = {result.config["train.lr"]: result for result in run.results}
    assert all(result.error is None for result in by_lr.values())
    stopped, survivor, last = (read_metrics(by_lr[lr].path) for lr in (1e-4, 1e-3, 2e-3))
    # stopped at the first rung: Tune heard of its first epoch only, its Train run did not finish
    assert by_lr[1e-4].metrics[EPOCHS_DONE] == 1 and by_lr[1e-4].metrics["training_iteration"] == 1
    assert stopped["epochs_completed"] < EPOCHS and not stopped.get("final"), stopped.get("epochs_completed")
    for finished in (survivor, last):  # ran all epochs and its final evaluation
        assert finished["epochs_completed"] == EPOCHS and finished["final"]["valid"]["rank_ic"] is not None

    # nothing is left reserved: the stopped trial's placement group was removed
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live and fvae_ray.available_resources().get("CPU") == 2.0:
            break
        time.sleep(1)
    assert not live, live
