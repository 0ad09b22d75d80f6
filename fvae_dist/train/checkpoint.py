"""What a checkpoint holds, how it is written and read back, and when a resume is refused.

A checkpoint is a directory that Ray Train persists under <run>/<checkpoint_epochNNNN>/:

    state.pt          (rank 0) model, optimizer, LR scheduler, grad scaler, epoch, history,
                      early-stopping state, best weights, resolved config, manifest hash
    rank-<r>.pt       (every rank) that worker's RNG state, plus its optimizer partition when
                      the optimizer state is sharded (DeepSpeed ZeRO >= 1)

Every file loads with torch.load(weights_only=True): only tensors and plain Python values are
stored (the config as a nested dict, numpy's RNG key as an int64 tensor).
"""
from __future__ import annotations

import io
import math
import pickle
import posixpath
import random
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from fvae_dist.errors import ConfigError
from fvae_dist.storage import UriPath, location, read_json, remove_tree

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "checkpoint_epoch"


def checkpoint_dir_name(epoch: int) -> str:
    """Name of the checkpoint written after `epoch` (0-based) completed."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary name, so a crash never leaves a torn file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load(path: "str | Path | UriPath") -> Any:
    """torch.load(weights_only=True): a checkpoint can never execute code on load. A file that
    is missing raises ConfigError, one that cannot be read back (truncated, corrupt) raises
    CorruptCheckpoint; both name the file."""
    try:
        source = io.BytesIO(path.read_bytes()) if isinstance(path, UriPath) else path
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: checkpoint file not found") from None
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc).lower():  # an object torch refuses to unpickle: not a torn file
            raise ConfigError(f"{path}: holds objects that weights_only loading refuses ({_first_line(exc)})") from None
        raise CorruptCheckpoint(f"{path}: not a readable checkpoint file (truncated or corrupt: {_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{path}: not a readable checkpoint file (truncated or corrupt: {_first_line(exc)})") from None


class CorruptCheckpoint(ConfigError):
    """A checkpoint file exists but cannot be read back."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# RNG state as tensors and plain values
# ----------------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["name"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------
# Resume guards
# ----------------------------------------------------------------------------------------------

def check_resumable(saved_config: dict, saved_hash: str, config: dict, manifest_hash: str, where: str) -> None:
    """Refuse to continue a run on other data or with another model.

    Training settings (epochs, lr, workers, ...) may change between attempts; the data set
    (manifest hash), the held-out stocks and the model architecture may not."""
    if saved_hash != manifest_hash:
        raise ConfigError(
            f"{where}: the run was trained on the data set with manifest hash {saved_hash}, but "
            f"data.dataset_dir now has manifest hash {manifest_hash}. Use a new ray.run_name, or point "
            "data.dataset_dir at the original data set."
        )
    differences = _differences(saved_config.get("model", {}), config.get("model", {}), "model", _model_defaults())
    saved_excluded = sorted(saved_config.get("data", {}).get("exclude_instruments", []))
    excluded = sorted(config.get("data", {}).get("exclude_instruments", []))
    if saved_excluded != excluded:
        differences.append(f"data.exclude_instruments: {saved_excluded} -> {excluded}")
    if differences:
        raise ConfigError(
            f"{where}: cannot resume this run with a different model or data selection "
            f"({'; '.join(differences)}). Use a new ray.run_name for a new run."
        )


def _differences(saved: dict, current: dict, section: str, defaults: dict) -> list[str]:
    """Keys whose values differ; a key the saved config lacks (written before that key existed)
    counts as its default."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{section}.{key}: {saved.get(key, defaults.get(key))!r} -> {current.get(key)!r}"
        for key in keys
        if saved.get(key, defaults.get(key)) != current.get(key)
    ]


def _model_defaults() -> dict:
    from fvae_dist.config import ExperimentConfig, config_to_dict

    return config_to_dict(ExperimentConfig())["model"]


# ----------------------------------------------------------------------------------------------
# Finding checkpoints in a run folder (outside Ray, e.g. for predict)
# ----------------------------------------------------------------------------------------------

def list_checkpoints(run_dir: "str | Path | UriPath") -> list:
    """Checkpoint directories of a run that hold a state file, oldest epoch first (local paths
    or URIs, as the run folder is)."""
    run_dir = location(run_dir)
    ours = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if _epoch_or_none(p) is not None]
    return sorted((p for p in ours if (p / STATE_FILE).is_file()), key=checkpoint_epoch)


def checkpoint_epoch(path: str | Path) -> int:
    """The epoch a checkpoint directory was written after (checkpoint_epoch0007 -> 7)."""
    name = _name(path)
    if not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX):].isdigit():
        raise ConfigError(f"{path}: not a checkpoint directory name ({CHECKPOINT_PREFIX}NNNN expected)")
    return int(name[len(CHECKPOINT_PREFIX):])


def resume_candidates(run_dir) -> list:
    """The run folder's checkpoints to try resuming from, newest first.

    The newest one may be one that Ray Train never registered: Ray registers a reported
    checkpoint when its controller next polls the workers, after report() has already written
    the files, and a worker that dies in between leaves a checkpoint Ray's restart does not hand
    back (its get_checkpoint() names the one before). Starting from Ray's would train that epoch
    twice; so the run folder decides, and `unreadable` tells which candidate can be used."""
    return list(reversed(list_checkpoints(run_dir)))


def unreadable(directory, load_state: Callable[[Path], dict] = load) -> str | None:
    """Why a checkpoint directory cannot be resumed from (None: every file reads back).

    Checks what a resume reads: state.pt loads, and every rank's file is there and loads.
    `load_state` is the loader the resume itself uses (DeepSpeed's optimizer state needs its
    classes allowed), so that whatever this accepts, the resume can read."""
    try:
        world = int(load_state(directory / STATE_FILE).get("world_size", 0))
        if world <= 0:
            return f"{directory / STATE_FILE}: records no world_size"
        missing = missing_rank_files(directory, world)
        if missing:
            return f"{directory}: incomplete checkpoint, missing {missing}"
        for rank in range(world):
            load_state(directory / rank_file(rank))
    except ConfigError as exc:  # CorruptCheckpoint or a missing file, named
        return str(exc)
    return None


def prune_unregistered(run_dir: str | Path, registered: Iterable[str | Path], keep: int,
                       history: list[dict]) -> list[Path]:
    """Delete the checkpoints Ray Train never registered that train.keep_checkpoints would have
    pruned; returns what was deleted.

    Such a checkpoint (see resume_candidates) is deleted only when the run has a
    newer registered one to resume from and its score (the epoch's checkpoint_score in
    metrics.json's history: validation Rank IC, as Ray ranks them) is below the `keep` best among
    the registered ones and itself. So the best epoch's checkpoint, which predict reads, always
    stays, as does one whose score is unknown. Registered checkpoints are Ray's to prune: its
    checkpoint list in the run folder names them. Deletion goes through the run folder's file
    system (storage.remove_tree), like Ray's own pruning."""
    registered_names = {_name(path) for path in registered}
    registered_epochs = [e for e in map(_epoch_or_none, registered_names) if e is not None]
    if not registered_epochs:
        return []
    scores = {int(h["epoch"]): h.get("checkpoint_score") for h in history if "epoch" in h}
    registered_scores = [_score(scores, e) for e in registered_epochs]
    registered_scores = [s for s in registered_scores if s is not None]
    deleted = []
    for path in list_checkpoints(run_dir):
        epoch = _epoch_or_none(path)
        if path.name in registered_names or epoch is None or epoch >= max(registered_epochs):
            continue
        score = _score(scores, epoch)
        better = sum(other > score for other in registered_scores) if score is not None else 0
        if score is None or better < keep:
            continue
        remove_tree(path)
        deleted.append(path)
    return deleted


def _name(path) -> str:
    """The last component of a local path, a UriPath, or a path Ray reports ("bucket/run/x")."""
    return path.name if isinstance(path, (Path, UriPath)) else posixpath.basename(str(path).rstrip("/"))


def _score(scores: dict, epoch: int) -> float | None:
    score = scores.get(epoch)
    return float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None


def _epoch_or_none(path: str | Path) -> int | None:
    try:
        return checkpoint_epoch(path)
    except ConfigError:
        return None


def missing_rank_files(directory: Path, world: int) -> list[str]:
    """Names of the per-rank files a checkpoint written by `world` workers lacks."""
    return [rank_file(rank) for rank in range(world) if not (directory / rank_file(rank)).is_file()]


def best_checkpoint(run_dir: "str | Path | UriPath"):
    """The checkpoint of the best validation epoch, as recorded in <run>/metrics.json."""
    run_dir = location(run_dir)
    metrics_path = run_dir / "metrics.json"
    metrics = read_json(metrics_path)
    if metrics is None:
        raise ConfigError(f"{metrics_path}: not found; is {run_dir} a run folder written by `fvae-dist train`?")
    best_epoch = metrics.get("best_epoch")
    if best_epoch is None:
        raise ConfigError(f"{metrics_path}: no best_epoch recorded yet (the run has not finished an epoch)")
    path = run_dir / checkpoint_dir_name(int(best_epoch))
    if not (path / STATE_FILE).is_file():
        kept = [p.name for p in list_checkpoints(run_dir)]
        raise ConfigError(f"{path}: the best epoch's checkpoint is missing; checkpoints present: {kept}")
    return path
