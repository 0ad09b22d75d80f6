"""Checkpoint files load with weights_only=True; RNG round trip; resume guards; LR schedule."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fvae_dist.config import ExperimentConfig, config_to_dict, load_config
from fvae_dist.errors import ConfigError
from fvae_dist.train import checkpoint as ckpt
from fvae_dist.train.engine import lr_factor


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save({"rng": ckpt.capture_rng_state(), "config": config_to_dict(ExperimentConfig())}, tmp_path / "r.pt")
    expected = (random.random(), np.random.standard_normal(3), torch.randn(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = ckpt.load(tmp_path / "r.pt")  # weights_only=True inside
    ckpt.restore_rng_state(loaded["rng"])
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.standard_normal(3), expected[1])
    assert torch.equal(torch.randn(3), expected[2])
    assert loaded["config"] == config_to_dict(ExperimentConfig())


def test_check_resumable_refuses_other_data_or_model():
    saved = config_to_dict(ExperimentConfig())
    same_model_other_training = config_to_dict(load_config(None, ["train.lr=0.1", "train.epochs=99"]))
    ckpt.check_resumable(saved, "abc", same_model_other_training, "abc", "run")  # allowed
    with pytest.raises(ConfigError, match="manifest hash abc.*xyz"):
        ckpt.check_resumable(saved, "abc", saved, "xyz", "run")
    with pytest.raises(ConfigError, match="model.hidden_size: 64 -> 32"):
        ckpt.check_resumable(saved, "abc", config_to_dict(load_config(None, ["model.hidden_size=32"])), "abc", "run")
    with pytest.raises(ConfigError, match="exclude_instruments"):
        ckpt.check_resumable(saved, "abc", config_to_dict(load_config(None, ["data.exclude_instruments=[A]"])), "abc", "r")


def test_best_checkpoint_needs_metrics(tmp_path):
    with pytest.raises(ConfigError, match="metrics.json"):
        ckpt.best_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.lr_schedule=constant"], [1, 1, 1, 1]),
        (["train.lr_schedule=step", "train.lr_step_epochs=2", "train.lr_step_gamma=0.5"], [1, 1, 0.5, 0.5]),
        (["train.lr_schedule=cosine", "train.epochs=4", "train.lr_min_ratio=0"], [1.0, 0.75, 0.25, 0.0]),
        (["train.lr_schedule=cosine", "train.epochs=3"], [1.0, 0.55, 0.1, 0.1]),  # default: ends at 0.1 lr, not 0
        (["train.warmup_epochs=1", "train.lr_schedule=constant"], [0.5, 1, 1, 1]),
    ],
)
def test_lr_factor(overrides, expected):
    train = load_config(None, overrides).train
    assert [lr_factor(train, e) for e in range(4)] == pytest.approx(expected)


def test_resume_accepts_a_config_saved_before_a_model_key_existed():
    saved = config_to_dict(load_config(None))
    del saved["model"]["name"]  # a run saved before model.name existed trained FactorVAE, the default
    ckpt.check_resumable(saved, "abc", config_to_dict(load_config(None)), "abc", "run")
    with pytest.raises(ConfigError, match=r"model.name: 'factorvae' -> 'gru'"):
        ckpt.check_resumable(saved, "abc", config_to_dict(load_config(None, ["model.name=gru"])), "abc", "run")


def _write_checkpoint(run_dir, epoch: int, world: int = 2, *, torn: bool = False, ranks=None):
    directory = run_dir / ckpt.checkpoint_dir_name(epoch)
    directory.mkdir(parents=True)
    if torn:  # a crash in the middle of copying state.pt
        (directory / ckpt.STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    else:
        ckpt.save({"world_size": world, "train_state": {"epoch": epoch + 1}}, directory / ckpt.STATE_FILE)
    for rank in range(world) if ranks is None else ranks:
        ckpt.save({"rng": None}, directory / ckpt.rank_file(rank))
    return directory


def test_resume_candidates_are_the_run_folders_checkpoints_newest_first(tmp_path):
    """Ray registers a checkpoint after report() wrote it; a worker dying in between leaves a
    newer checkpoint that Ray does not hand back: the run folder decides (train/checkpoint.py)."""
    first, second = _write_checkpoint(tmp_path, 0), _write_checkpoint(tmp_path, 1)
    assert ckpt.resume_candidates(tmp_path) == [second, first]
    assert ckpt.resume_candidates(tmp_path / "empty") == []


def test_unreadable_names_what_a_resume_could_not_read(tmp_path):
    assert ckpt.unreadable(_write_checkpoint(tmp_path, 0)) is None
    assert ckpt.unreadable(_write_checkpoint(tmp_path, 3, world=1)) is None
    missing = ckpt.unreadable(_write_checkpoint(tmp_path, 1, ranks=[0]))  # rank 1's file never arrived
    assert "incomplete checkpoint, missing ['rank-1.pt']" in missing
    torn = ckpt.unreadable(_write_checkpoint(tmp_path, 2, torn=True))   # state.pt cut short
    assert f"{ckpt.checkpoint_dir_name(2)}/{ckpt.STATE_FILE}: not a readable checkpoint file" in torn
    damaged = _write_checkpoint(tmp_path, 4)
    (damaged / ckpt.rank_file(1)).write_bytes((damaged / ckpt.rank_file(1)).read_bytes()[:20])
    assert f"{ckpt.rank_file(1)}: not a readable checkpoint file" in ckpt.unreadable(damaged)


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / ckpt.STATE_FILE
    ckpt.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ckpt.CorruptCheckpoint, match=f"{path}: not a readable checkpoint file .truncated or corrupt"):
        ckpt.load(path)


def test_checkpoint_epoch_reads_the_directory_name(tmp_path):
    assert ckpt.checkpoint_epoch(tmp_path / ckpt.checkpoint_dir_name(12)) == 12
    with pytest.raises(ConfigError, match="checkpoint_epochNNNN expected"):
        ckpt.checkpoint_epoch(tmp_path / "checkpoint_2026-11-24")


def test_checkpoints_named_otherwise_are_left_to_ray(tmp_path):
    ours = _write_checkpoint(tmp_path, 1)
    (tmp_path / "checkpoint_epochXYZ").mkdir()
    ckpt.save({"world_size": 1}, tmp_path / "checkpoint_epochXYZ" / ckpt.STATE_FILE)
    (tmp_path / "checkpoint_2026-11-24_10-00").mkdir()
    assert ckpt.resume_candidates(tmp_path)[0] == ours
    assert all(path.name != "checkpoint_2026-11-24_10-00" for path in ckpt.resume_candidates(tmp_path))


def test_a_checkpoint_is_read_with_the_resumes_loader(tmp_path):
    """A DeepSpeed run's state.pt holds DeepSpeed classes that plain weights_only loading
    refuses; the check must read it the way the resume does, or it never accepts one."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from fvae_dist.train.loop import _load_checkpoint_file

    newer = tmp_path / ckpt.checkpoint_dir_name(1)
    newer.mkdir()
    scaler = LossScaler(scale=1.0)
    ckpt.save({"world_size": 1, "optimizer": {"loss_scaler": scaler}}, newer / ckpt.STATE_FILE)
    ckpt.save({"rng": None}, newer / ckpt.rank_file(0))
    assert "weights_only loading refuses" in ckpt.unreadable(newer)  # the plain loader refuses it
    assert ckpt.unreadable(newer, load_state=_load_checkpoint_file) is None


def _history(scores: dict[int, float | None]) -> list[dict]:
    return [{"epoch": epoch, "checkpoint_score": score} for epoch, score in scores.items()]


def test_an_unregistered_checkpoint_is_pruned_when_keep_checkpoints_would_have(tmp_path):
    # epoch 1 was written, the worker died before Ray registered it, the run resumed from it;
    # Ray kept epochs 2 and 4 (keep_checkpoints=2, ranked by score)
    orphan = _write_checkpoint(tmp_path, 1)
    kept = [_write_checkpoint(tmp_path, 2), _write_checkpoint(tmp_path, 4)]
    history = _history({0: 0.01, 1: 0.02, 2: 0.05, 3: 0.03, 4: 0.04})
    assert ckpt.prune_unregistered(tmp_path, kept, keep=2, history=history) == [orphan]
    assert ckpt.list_checkpoints(tmp_path) == kept
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing half-deleted left
    assert ckpt.prune_unregistered(tmp_path, kept, keep=2, history=history) == []


@pytest.mark.parametrize("orphan_score, keep", [(0.045, 2), (0.04, 2), (0.02, 3), (None, 2), (float("nan"), 2)])
def test_an_unregistered_checkpoint_among_the_best_or_unscored_is_kept(tmp_path, orphan_score, keep):
    orphan = _write_checkpoint(tmp_path, 1)
    kept = [_write_checkpoint(tmp_path, 2), _write_checkpoint(tmp_path, 4)]
    history = _history({1: orphan_score, 2: 0.05, 4: 0.04})
    assert ckpt.prune_unregistered(tmp_path, kept, keep=keep, history=history) == []
    assert orphan in ckpt.list_checkpoints(tmp_path)


def test_the_newest_checkpoint_is_never_pruned_and_nothing_without_registered_ones(tmp_path):
    kept = [_write_checkpoint(tmp_path, 2)]
    newest = _write_checkpoint(tmp_path, 3)            # newer than anything Ray registered: a resume point
    history = _history({2: 0.05, 3: -0.5})
    assert ckpt.prune_unregistered(tmp_path, kept, keep=1, history=history) == []
    assert ckpt.prune_unregistered(tmp_path, [], keep=1, history=history) == []
    assert ckpt.list_checkpoints(tmp_path) == kept + [newest]
