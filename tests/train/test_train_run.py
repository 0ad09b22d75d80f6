"""End to end on 2 CPUs: a 2-worker Ray Train run, its run folder, resume, predict, bf16.

One run (3 epochs) is shared by the tests of this module, in file order; the resume test
extends it to 5 epochs, so it comes after the tests that read the 3-epoch state.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fvae_dist.config import load_config
from fvae_dist.data.shards import iter_shard_days, load_manifest, manifest_hash, shard_entries
from fvae_dist.errors import ConfigError
from fvae_dist.train import checkpoint as ckpt
from fvae_dist.cli import main as cli_main
from fvae_dist.errors import DataError
from fvae_dist.train.engine import deepspeed_safe_globals
from fvae_dist.train.predict import predict_split
from fvae_dist.train.trainer import train
from tests.toy_dataset import tiny_overrides
from tests.toy_dataset import write_toy_dataset

pytestmark = [pytest.mark.ray]

RUN = "two-workers"


def _cfg(toy_dir, storage, *extra, run=RUN):
    return load_config(None, tiny_overrides(toy_dir, storage, run, "train.epochs=3", "train.audit_days=true",
                                            "train.lr=3e-3", "train.early_stopping_patience=0", *extra))


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def first_run(ray_local, toy_dir, storage):
    outcome = train(_cfg(toy_dir, storage))
    return outcome, json.loads(json.dumps(outcome.metrics))


@pytest.mark.timeout(300)
def test_run_folder_holds_everything(first_run, toy_dir):
    outcome, metrics = first_run
    run_dir = outcome.run_dir
    for name in ("config.yaml", "manifest_hash.txt", "metrics.json", "tensorboard"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "manifest_hash.txt").read_text().strip() == manifest_hash(toy_dir)
    assert load_config(run_dir / "config.yaml").model.hidden_size == 8
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2]
    assert metrics["epochs_completed"] == 3
    best = metrics["best_epoch"]
    assert metrics["best_valid_rank_ic"] == pytest.approx(max(h["valid_rank_ic"] for h in metrics["history"]))
    assert metrics["history"][best]["valid_rank_ic"] == pytest.approx(metrics["best_valid_rank_ic"])
    # final valid metrics are those of the best epoch's weights, recomputed after training
    assert metrics["final"]["valid"]["rank_ic"] == pytest.approx(metrics["best_valid_rank_ic"], abs=1e-9)
    n_test_days = load_manifest(toy_dir)["splits"]["test"]["n_days"]
    assert metrics["final"]["test"]["days"] == n_test_days
    for h in metrics["history"]:
        assert math.isfinite(h["train_loss"]) and h["perf_stock_days_per_s"] > 0
        assert 0 <= h["perf_data_wait_fraction"] <= 1
        assert 0 < h["perf_step_fraction"] <= 1 and h["perf_step_fraction"] + h["perf_data_wait_fraction"] <= 1
        assert h["perf_allreduce"] == "process_group"        # two DDP workers on CPU: gloo


@pytest.mark.timeout(60)
def test_checkpoints_every_epoch_load_with_weights_only(first_run):
    outcome, metrics = first_run
    kept = ckpt.list_checkpoints(outcome.run_dir)
    # keep_checkpoints=2: the latest and the best survive
    names = {p.name for p in kept}
    assert ckpt.checkpoint_dir_name(2) in names and ckpt.checkpoint_dir_name(metrics["best_epoch"]) in names
    state = torch.load(kept[-1] / ckpt.STATE_FILE, weights_only=True)
    assert state["train_state"]["epoch"] == 3 and state["manifest_hash"] == metrics["manifest_hash"]
    assert set(state) >= {"model", "optimizer", "scaler", "best_model", "config", "world_size"}
    for rank in (0, 1):
        assert "rng" in torch.load(kept[-1] / ckpt.rank_file(rank), weights_only=True)


@pytest.mark.timeout(60)
def test_tensorboard_events_have_the_tags_and_values(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    outcome, metrics = first_run
    events = EventAccumulator(str(outcome.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/nll", "train/kl", "valid/loss", "valid/ic", "valid/rank_ic", "valid/icir",
                "valid/rank_icir", "lr", "perf/stock_days_per_s", "perf/data_wait_fraction"}
    assert expected <= tags, expected - tags
    for tag, key in (("valid/rank_ic", "valid_rank_ic"), ("train/nll", "train_nll"), ("lr", "lr")):
        values = [e.value for e in events.Scalars(tag)]
        assert [e.step for e in events.Scalars(tag)] == [0, 1, 2]
        assert values == pytest.approx([h[key] for h in metrics["history"]], rel=1e-5)
    hparams = EventAccumulator(str(outcome.run_dir / "tensorboard" / "hparams"))
    hparams.Reload()
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams.PluginTagToContent("hparams"))
    assert "hparam/valid_rank_ic" in hparams.Tags()["scalars"]


@pytest.mark.timeout(60)
def test_workers_train_on_disjoint_days_with_equal_steps(first_run, toy_dir):
    outcome, _ = first_run
    n_train_days = load_manifest(toy_dir)["splits"]["train"]["n_days"]
    orders = []
    for epoch in range(3):
        audits = [json.loads((outcome.run_dir / "audit" / f"epoch-{epoch:04d}-rank-{r}.json").read_text())
                  for r in (0, 1)]
        assert audits[0]["steps"] == audits[1]["steps"] == n_train_days // 2
        assert not set(audits[0]["dates"]) & set(audits[1]["dates"])
        assert len(set(audits[0]["dates"]) | set(audits[1]["dates"])) == n_train_days
        orders.append(audits[0]["dates"] + audits[1]["dates"])
    assert orders[0] != orders[1], "day order should be reshuffled every epoch"


@pytest.mark.timeout(400)
def test_workers_with_unequal_day_shares_take_equal_steps(ray_local, storage, tmp_path):
    """streaming_split(equal=True) gives each worker equally many blocks, not days: 25 training
    days in shards of 13 and 12 at data.days_per_block=5 are blocks of 5, 4, 4 and 4, 4, 4 days,
    so the shares hold 13 and 12 days. Both workers take 12 steps every epoch (the loop stops
    them when the first runs out, so DDP never waits for a step one worker skips) and the run
    ends."""
    toy = write_toy_dataset(tmp_path / "uneven", split_days={"train": 25, "valid": 4, "test": 4})
    outcome = train(load_config(None, tiny_overrides(
        toy, storage, "uneven-shares", "train.epochs=2", "train.audit_days=true", "data.days_per_block=5",
        "train.early_stopping_patience=0", "data.test_split=none")))
    assert outcome.metrics["epochs_completed"] == 2
    for epoch in range(2):
        audits = [json.loads((outcome.run_dir / "audit" / f"epoch-{epoch:04d}-rank-{r}.json").read_text())
                  for r in (0, 1)]
        assert audits[0]["steps"] == audits[1]["steps"] == 12
        assert not set(audits[0]["dates"]) & set(audits[1]["dates"])
        assert len(set(audits[0]["dates"]) | set(audits[1]["dates"])) == 24
        assert outcome.metrics["history"][epoch]["train_steps"] == 12


@pytest.mark.timeout(120)
def test_predict_scores_every_stock_day_of_the_test_split(first_run, toy_dir, capsys):
    outcome, _ = first_run
    assert cli_main(["predict", "--run", str(outcome.run_dir), "--split", "test"]) == 0
    assert "Rank IC" in capsys.readouterr().out
    path = outcome.run_dir / "predictions" / "test.parquet"
    frame = pd.read_parquet(path)
    assert list(frame.columns) == ["date", "instrument", "mu", "sigma", "label"]
    manifest = load_manifest(toy_dir)
    expected = {
        (pd.Timestamp(day.date), inst)
        for entry in shard_entries(manifest, "test")
        for day in iter_shard_days(toy_dir, entry, drop_nan_label=False, manifest=manifest)
        for inst in day.instruments
    }
    assert set(zip(frame["date"], frame["instrument"])) == expected and len(frame) == len(expected)
    assert frame["label"].isna().any(), "stock-days without a label are scored too"
    assert np.isfinite(frame["mu"]).all() and (frame["sigma"] > 0).all()


@pytest.mark.timeout(60)
def test_rerun_with_another_model_is_refused(first_run, toy_dir, storage):
    with pytest.raises(ConfigError, match="model.hidden_size: 8 -> 16"):
        train(_cfg(toy_dir, storage, "model.hidden_size=16"))


@pytest.mark.timeout(300)
def test_rerun_resumes_from_the_last_epoch(first_run, toy_dir, storage):
    outcome, before = first_run
    first_audit = outcome.run_dir / "audit" / "epoch-0000-rank-0.json"
    stamp = first_audit.stat().st_mtime_ns
    resumed = train(_cfg(toy_dir, storage, "train.epochs=5"))
    history = resumed.metrics["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert history[:3] == before["history"], "epochs 0-2 come from the checkpoint, not a new run"
    assert first_audit.stat().st_mtime_ns == stamp, "epoch 0 was not trained again"
    assert (outcome.run_dir / "audit" / "epoch-0004-rank-1.json").is_file()
    assert ckpt.checkpoint_dir_name(4) in {p.name for p in ckpt.list_checkpoints(outcome.run_dir)}
    assert _tensorboard_steps(outcome.run_dir / "tensorboard", "train/loss") == [0, 1, 2, 3, 4]


@pytest.mark.timeout(120)
def test_predict_can_write_factor_exposures(first_run):
    outcome, _ = first_run
    frame = pd.read_parquet(predict_split(outcome.run_dir, "valid", exposures=True))
    assert {"beta_0", "beta_1"} <= set(frame.columns) and "beta_2" not in frame.columns  # K = 2


@pytest.mark.timeout(300)
def test_bf16_autocast_runs_on_cpu_through_the_cli(ray_local, toy_dir, storage, capsys):
    argv = ["train", *tiny_overrides(toy_dir, storage, "bf16", "train.epochs=1", "train.precision=bf16",
                                     "ray.num_workers=1", "data.batch_days=2")]
    assert cli_main(argv) == 0
    assert "best epoch: 1" in capsys.readouterr().out
    metrics = json.loads((storage / "bf16" / "metrics.json").read_text())
    assert math.isfinite(metrics["history"][0]["train_loss"])
    assert math.isfinite(metrics["final"]["valid"]["loss"])


@pytest.mark.timeout(300)
def test_a_workers_own_error_reaches_the_caller_unwrapped(ray_local, toy_dir, storage):
    def failing_builder(model_cfg):
        raise DataError("stand-in model: refuses to build")

    cfg = load_config(None, tiny_overrides(toy_dir, storage, "failing", "train.epochs=1", "ray.num_workers=1"))
    with pytest.raises(DataError, match="refuses to build"):
        train(cfg, model_builder=failing_builder)


@pytest.mark.timeout(300)
def test_early_stopping_ends_the_run_and_the_cluster_still_runs_datasets(ray_local, toy_dir, storage):
    """Early stopping leaves the feeders' read-ahead epoch unused: it is drained, and Ray Data
    executions started afterwards still get CPUs (an execution cut off mid-epoch kept them)."""
    cfg = load_config(None, tiny_overrides(toy_dir, storage, "early-stop", "train.epochs=6",
                                           "train.early_stopping_patience=1", "train.early_stopping_min_delta=10"))
    metrics = train(cfg).metrics
    assert metrics["epochs_completed"] == 2 and metrics["stopped_early"]
    assert metrics["final"]["test"]["days"] == load_manifest(toy_dir)["splits"]["test"]["n_days"]
    from fvae_dist.data.stream import day_blocks, iter_day_batches

    days = sum(len(b["date"]) for b in iter_day_batches(day_blocks(toy_dir, "valid", days_per_block=2), 1))
    assert days == load_manifest(toy_dir)["splits"]["valid"]["n_days"]


@pytest.mark.timeout(400)
def test_a_worker_that_dies_mid_epoch_is_restarted_from_the_last_checkpoint(ray_local, toy_dir, storage, tmp_path):
    """ray.max_failures=1: rank 0's process is SIGKILLed at the first step of epoch 1; the
    restarted workers resume from epoch 0's checkpoint and the run finishes with every epoch
    once in metrics.json and in TensorBoard, and as many optimizer steps as an uninterrupted
    run. That early, Ray Train has often not registered the checkpoint yet (train/checkpoint.py):
    without looking in the run folder, epoch 0 was trained again. The feeders' Ray Data
    executions are cut off by the crash; the new workers' must still run."""
    died = tmp_path / "rank-0-died"
    steps_per_epoch = load_manifest(toy_dir)["splits"]["train"]["n_days"] // 2  # 2 workers, 1 day a step

    def dying_builder(model_cfg):
        import os
        import signal

        import ray.train

        from fvae_dist.models.registry import build_model

        class DiesOnce(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = build_model(model_cfg)
                self.training_calls = 0

            def forward(self, *args):
                if self.training:
                    self.training_calls += 1
                    if (self.training_calls == steps_per_epoch + 1 and not died.exists()
                            and ray.train.get_context().get_world_rank() == 0):
                        died.write_text("epoch 1, step 1")
                        os.kill(os.getpid(), signal.SIGKILL)
                return self.inner(*args)

            def predict(self, *args):
                return self.inner.predict(*args)

        return DiesOnce()

    cfg = load_config(None, tiny_overrides(toy_dir, storage, "dies-once", "train.epochs=3", "ray.max_failures=1",
                                           "train.audit_days=true", "train.early_stopping_patience=0"))
    outcome = train(cfg, model_builder=dying_builder)
    assert died.is_file(), "the stand-in worker did not die: the test tested nothing"
    history = outcome.metrics["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and outcome.metrics["epochs_completed"] == 3
    audit = outcome.run_dir / "audit"
    death = died.stat().st_mtime_ns
    assert (audit / "epoch-0000-rank-0.json").stat().st_mtime_ns < death, "epoch 0 came from its checkpoint"
    assert (audit / "epoch-0001-rank-0.json").stat().st_mtime_ns > death, "epoch 1 was trained again"
    assert outcome.metrics["final"]["test"]["days"] == load_manifest(toy_dir)["splits"]["test"]["n_days"]
    assert [h["train_steps"] for h in history] == [steps_per_epoch] * 3, "as many steps as an uninterrupted run"
    assert _tensorboard_steps(outcome.run_dir / "tensorboard", "train/loss") == [0, 1, 2]


def _tensorboard_steps(log_dir, tag: str) -> list[int]:
    """The steps of `tag` over every events file of the run (one per attempt would repeat epochs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        steps += [event.step for event in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []
    return sorted(steps)


@pytest.mark.timeout(400)
def test_one_worker_runs_repeat_exactly_from_the_seed(ray_local, toy_dir, storage):
    """With one worker a seed fixes everything: the days' order in every epoch (Ray Data keeps
    block order, data/stream.py) and hence losses and metrics. Before, blocks came in the order
    their read tasks finished and two runs of one seed trained on different day orders."""
    runs = []
    for attempt in range(2):
        cfg = load_config(None, tiny_overrides(toy_dir, storage, f"repeat-{attempt}", "train.epochs=2",
                                               "train.audit_days=true", "ray.num_workers=1",
                                               "train.early_stopping_patience=0"))
        outcome = train(cfg)
        days = [json.loads((outcome.run_dir / "audit" / f"epoch-{e:04d}-rank-0.json").read_text())["dates"]
                for e in range(2)]
        runs.append((days, outcome.metrics))
    (days_a, metrics_a), (days_b, metrics_b) = runs
    assert days_a == days_b and days_a[0] != days_a[1], "same order per epoch, reshuffled between epochs"
    for key in ("train_loss", "valid_loss", "valid_rank_ic"):
        assert [h[key] for h in metrics_a["history"]] == [h[key] for h in metrics_b["history"]], key
    assert metrics_a["final"] == metrics_b["final"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cpu_kernels, expected", [("auto", "MALLOC_ARENA_MAX=1"), ("off", "MALLOC_ARENA_MAX=None")])
def test_workers_start_with_the_allocator_environment_only_when_asked(ray_local, toy_dir, storage, cpu_kernels,
                                                                       expected):
    """accel/memory.py: glibc reads MALLOC_ARENA_MAX at process start, so the worker must be
    started with it (train.cpu_kernels=auto), and without it when the fast paths are off; the
    stand-in builder runs inside the worker and reports what it sees."""
    def reporting_builder(model_cfg):
        import os

        raise DataError(f"worker env: MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')}")

    cfg = load_config(None, tiny_overrides(toy_dir, storage, f"worker-env-{cpu_kernels}", "train.epochs=1",
                                           "ray.num_workers=1", f"train.cpu_kernels={cpu_kernels}"))
    with pytest.raises(DataError, match=f"worker env: {expected}$"):
        train(cfg, model_builder=reporting_builder)


@pytest.mark.timeout(400)
def test_deepspeed_zero1_bf16_trains_and_resumes(ray_local, toy_dir, storage):
    extra = ("train.deepspeed=true", "train.deepspeed_zero_stage=1", "train.precision=bf16")
    first = train(load_config(None, tiny_overrides(toy_dir, storage, "deepspeed", "train.epochs=1", *extra)))
    assert first.metrics["epochs_completed"] == 1
    state_dir = ckpt.list_checkpoints(first.run_dir)[-1]
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        rank_state = torch.load(state_dir / ckpt.rank_file(1), weights_only=True)
    assert "optimizer" in rank_state  # each rank keeps its own ZeRO partition
    second = train(load_config(None, tiny_overrides(toy_dir, storage, "deepspeed", "train.epochs=2", *extra)))
    assert [h["epoch"] for h in second.metrics["history"]] == [0, 1]
    assert second.metrics["history"][0] == first.metrics["history"][0]
