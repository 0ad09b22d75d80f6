"""The per-worker training function that Ray Train runs on every worker.

    train_loop_per_worker(loop_config)        the TorchTrainer's train_loop_per_worker

Read top to bottom: set threads and seeds, build the model and its engine (DDP or DeepSpeed),
resume from Ray's latest checkpoint if there is one, start this worker's feeder actor (it reads
and pads the training days in its own process, data/feeder.py), then per epoch:
    train on this worker's days -> (the feeder starts on the next epoch's days) -> validate (all
    workers, sums all-reduced) -> early-stopping bookkeeping -> ray.train.report(metrics,
    checkpoint) -> rank 0: metrics.json + TensorBoard
and at the end score the best epoch's weights on the validation and test splits.

loop_config (plain data, built by train/trainer.py):
    config          config_to_dict(ExperimentConfig)
    manifest_hash   hash of the data set's manifest.json
    run_dir         <storage>/<run name> (a path or a URI), where rank 0 writes metrics.json and
                    tensorboard/ through the storage's file system
    eval_splits     names of the evaluation datasets passed to the trainer ("valid", "test")
    model_builder   optional callable(ModelConfig) -> nn.Module (tests); by default
                    models/registry.build_model builds the model that model.name names
    index_membership  train.index_membership's table (read on the driver) when
                    train.index_share > 0, else None
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from fvae_dist import accel
from fvae_dist.config import ExperimentConfig, config_from_dict, config_to_dict, json_safe, write_text_atomic
from fvae_dist.data.feeder import EpochStream, feeder_for
from fvae_dist.data.stream import iter_day_batches, within_block_seed
from fvae_dist.errors import ConfigError
from fvae_dist.storage import download_dir, location, read_json
from fvae_dist.train import checkpoint as ckpt
from fvae_dist.train.engine import build_engine, deepspeed_safe_globals, lr_factor
from fvae_dist.train.loss_weights import IndexMemberWeights
from fvae_dist.train.tensorboard import RunEvents
from fvae_dist.train.thread_stats import minor_faults_this_thread, peak_rss_mb, preemptions_this_thread
from fvae_dist.train.validation import evaluate, to_device

METRICS_FILE = "metrics.json"
UNDEFINED_SCORE = -2.0  # below any Rank IC: an epoch whose Rank IC is undefined is never "best"


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run must continue from."""

    epoch: int = 0  # epochs completed
    history: list = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float = -math.inf
    bad_epochs: int = 0
    stopped_early: bool = False

    def observe(self, epoch: int, score: float, patience: int, min_delta: float) -> bool:
        """Record the epoch's validation score; True when it is the new best."""
        improved = self.best_epoch is None or score > self.best_score + min_delta
        if improved:
            self.best_epoch, self.best_score, self.bad_epochs = epoch, score, 0
        else:
            self.bad_epochs += 1
        self.stopped_early = patience > 0 and self.bad_epochs >= patience
        return improved


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"], source="train loop config")
    run_dir = location(loop_config["run_dir"])  # a local path or a storage URI
    manifest_hash = loop_config["manifest_hash"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    quiet_ray_train_logs(cfg.ray.log_level)
    torch.set_num_threads(intra_op_threads(cfg))
    device = ray.train.torch.get_device()
    accel.prepare_worker_process(cfg.train.cpu_kernels, device.type)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    builder = loop_config.get("model_builder") or _default_builder
    # the model as written, then the optional CPU fast paths swapped in (train.cpu_kernels)
    model = accel.prepare_model(builder(cfg.model), cfg.train.cpu_kernels, device.type)
    engine = build_engine(model, cfg, device, world)
    best_weights = None
    # train.index_share: the loss leans towards an index's members (train/loss_weights.py)
    membership = loop_config.get("index_membership")
    loss_weights = IndexMemberWeights(membership, cfg.train.index_share) if membership is not None else None

    state = TrainState()
    with checkpoint_to_resume(run_dir, rank) as directory:
        if directory is not None:
            state, best_weights = resume(directory, engine, cfg, manifest_hash, rank, world)
            if rank == 0:
                sys.stdout.write(f"resuming from {directory.name}: {state.epoch} of {cfg.train.epochs} epochs done\n")
    if directory is None:
        # sampling noise (reparameterisation) differs per rank, like the data does
        seed_everything(cfg.train.seed + 1 + rank)

    # rank 0 writes the events, replaying the epochs the checkpoint holds: each epoch once
    events = RunEvents(run_dir / "tensorboard", history=state.history) if rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard(cfg.data.valid_split)
    # data.feeder: a process that reads and pads this worker's training days (data/feeder.py)
    with feeder_for(train_shard, enabled=cfg.data.feeder) as feeder:
        upcoming = None  # the next epoch's feeder stream, started during validation
        while state.epoch < cfg.train.epochs and not state.stopped_early:
            epoch = state.epoch
            lr = cfg.train.lr * lr_factor(cfg.train, epoch)
            engine.set_lr(lr)
            batches = upcoming or training_batches(feeder or train_shard, cfg, epoch)
            train = train_one_epoch(engine, batches, cfg, device, world, run_dir, epoch, rank, loss_weights)
            # The feeder reads the next epoch's first days while this one is validated (it would
            # idle otherwise); an epoch early stopping then cancels is drained below.
            upcoming = training_batches(feeder, cfg, epoch + 1) if feeder is not None and epoch + 1 < cfg.train.epochs else None
            valid = evaluate_split(engine, valid_shard, cfg, device)
            score = valid["rank_ic"] if math.isfinite(valid["rank_ic"]) else UNDEFINED_SCORE
            if state.observe(epoch, score, cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta):
                best_weights = _cpu_copy(engine.module.state_dict())
            metrics = epoch_metrics(epoch, lr, train, valid, score, state)
            state.history.append(metrics)
            state.epoch = epoch + 1
            report_epoch(metrics, engine, state, best_weights, cfg, manifest_hash, rank, world)
            if rank == 0:
                events.log_epoch(epoch, metrics)
                write_metrics(run_dir, state, manifest_hash)
                # sys.stdout, not print: Ray Train patches print() and the line would show twice
                sys.stdout.write(progress_line(metrics, cfg.train.epochs) + "\n")
                sys.stdout.flush()
        if upcoming is not None:  # early stopping: that epoch will not run; let the feeder
            upcoming.close()      # finish reading it rather than stop it halfway (feeder.py)

    final = final_evaluation(engine, best_weights, loop_config.get("eval_splits", ()), cfg, device)
    ray.train.report(_finite_only({f"final_{split}_{key}": value for split, values in final.items() for key, value in values.items()}))
    if rank == 0:
        write_metrics(run_dir, state, manifest_hash, final=final)
        events.log_hparams(config_to_dict(cfg), {f"{s}_{k}": v for s, vs in final.items() for k, v in vs.items()})
        events.close()


# ----------------------------------------------------------------------------------------------
# Epoch pieces
# ----------------------------------------------------------------------------------------------

def training_batches(source, cfg: ExperimentConfig, epoch: int):
    """One epoch of this worker's training batches: from its feeder actor (data.feeder, the
    feeder starts reading at once) or from its Ray Data shard in background threads. The days
    inside each block come in an order of this epoch's own (data/stream.py, within_block_seed)."""
    shuffle_seed = within_block_seed(cfg.train.seed, epoch)
    if cfg.data.feeder:
        return EpochStream(source, cfg.data.batch_days, prefetch_batches=cfg.data.prefetch_batches, drop_last=True,
                           shuffle_seed=shuffle_seed)
    return iter_day_batches(source, cfg.data.batch_days, prefetch_batches=cfg.data.prefetch_batches,
                            drop_last=True, background=True, shuffle_seed=shuffle_seed)


def train_one_epoch(engine, batches, cfg: ExperimentConfig, device, world: int, run_dir: Path, epoch: int, rank: int,
                    loss_weights: IndexMemberWeights | None = None) -> dict:
    """One pass over this worker's share of the training days; returns all-worker averages.
    loss_weights: per-stock weights of each day's loss (train.index_share), or None.

    Every worker takes the same number of steps, as DDP's gradient all-reduce needs: see
    LockstepBatches."""
    engine.module.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, nll, kl (sums over steps)
    steps, stock_days, stepping = 0, 0, 0.0
    dates: list[str] = []
    faults_before, preemptions_before = minor_faults_this_thread(), preemptions_this_thread()
    start = time.perf_counter()
    fetching = LockstepBatches(batches, world, device)
    for batch in fetching:
        x, mask, y = to_device(batch, device)
        weight = torch.from_numpy(loss_weights(batch)).to(device) if loss_weights is not None else None
        before = time.perf_counter()
        out = engine.train_step(x, mask, y, weight)
        stepping += time.perf_counter() - before
        sums += torch.stack([out["loss"].detach(), out["nll"].detach(), out["kl"].detach()]).double()
        steps += 1
        stock_days += int(batch["mask"].sum())
        if cfg.train.audit_days:
            dates.extend(str(d) for d in batch["date"])
    waited = fetching.wait_seconds
    batches.close()
    elapsed = time.perf_counter() - start
    faults = minor_faults_this_thread() - faults_before
    preemptions = preemptions_this_thread() - preemptions_before
    if cfg.train.audit_days:
        write_text_atomic(run_dir / "audit" / f"epoch-{epoch:04d}-rank-{rank}.json",
                          json.dumps({"epoch": epoch, "rank": rank, "steps": steps, "dates": dates}))
    totals = torch.cat([sums.cpu(), torch.tensor([steps, stock_days, waited, stepping, elapsed, faults, preemptions],
                                                 dtype=torch.float64)])
    totals = _all_reduce_sum(totals, device)
    (loss, nll, kl, all_steps, all_stock_days, all_waited, all_stepping, all_elapsed, all_faults,
     all_preemptions) = totals.tolist()
    per_step = max(all_steps, 1.0)
    mean_elapsed = all_elapsed / world
    return {
        "loss": loss / per_step,
        "nll": nll / per_step,
        "kl": kl / per_step,
        "steps": int(all_steps / world),
        "stock_days": int(all_stock_days),
        "seconds": mean_elapsed,
        "stock_days_per_s": all_stock_days / mean_elapsed if mean_elapsed > 0 else 0.0,
        "data_wait_fraction": all_waited / all_elapsed if all_elapsed > 0 else 0.0,
        "step_fraction": all_stepping / all_elapsed if all_elapsed > 0 else 0.0,
        # the training thread's page faults; hundreds or more per step mean the allocator
        # returns memory to the kernel between steps (accel/memory.py)
        "minor_faults_per_step": all_faults / per_step,
        # the training thread losing its CPU to other threads (neighbours on its core)
        "preemptions_per_step": all_preemptions / per_step,
        "allreduce": engine.allreduce,  # "process_group", "deepspeed" or "none"
    }


def evaluate_split(engine, shard, cfg: ExperimentConfig, device) -> dict:
    batches = iter_day_batches(shard, cfg.data.batch_days, prefetch_batches=cfg.data.prefetch_batches,
                               drop_last=False, background=True)
    return evaluate(engine.module, batches, device=device, autocast=engine.autocast).all_reduce().summary()


def epoch_metrics(epoch: int, lr: float, train: dict, valid: dict, score: float, state: TrainState) -> dict:
    metrics = {"epoch": epoch, "lr": lr}
    metrics.update({f"train_{k}": train[k] for k in ("loss", "nll", "kl", "steps", "stock_days")})
    metrics.update({f"valid_{k}": valid[k] for k in ("loss", "nll", "kl", "ic", "icir", "rank_ic", "rank_icir", "days")})
    metrics.update(
        perf_stock_days_per_s=train["stock_days_per_s"],
        perf_data_wait_fraction=train["data_wait_fraction"],
        perf_step_fraction=train["step_fraction"],
        perf_minor_faults_per_step=train["minor_faults_per_step"],
        perf_preemptions_per_step=train["preemptions_per_step"],
        perf_epoch_seconds=train["seconds"],
        perf_peak_rss_mb=peak_rss_mb(),  # rank 0's worker process
        perf_allreduce=train["allreduce"],
        checkpoint_score=score,
        best_epoch=state.best_epoch,
        best_valid_rank_ic=state.best_score,
    )
    return metrics


def progress_line(metrics: dict, epochs: int) -> str:
    return (f"epoch {metrics['epoch'] + 1}/{epochs}: train loss {metrics['train_loss']:.4f} "
            f"(nll {metrics['train_nll']:.4f}, kl {metrics['train_kl']:.4f}) | valid loss {metrics['valid_loss']:.4f} "
            f"Rank IC {metrics['valid_rank_ic']:.4f} | {metrics['perf_stock_days_per_s']:,.0f} stock-days/s, "
            f"data wait {100 * metrics['perf_data_wait_fraction']:.1f}% | best epoch {metrics['best_epoch'] + 1}")


def report_epoch(metrics, engine, state: TrainState, best_weights, cfg, manifest_hash, rank, world) -> None:
    """ray.train.report with this epoch's checkpoint; every rank adds its own file to it."""
    with tempfile.TemporaryDirectory(prefix="fvae-ckpt-") as directory:
        directory = Path(directory)
        if rank == 0:
            ckpt.save(
                {
                    "model": _cpu_copy(engine.module.state_dict()),
                    "best_model": best_weights,
                    **engine.shared_state(),
                    "train_state": asdict(state),
                    "config": config_to_dict(cfg),
                    "manifest_hash": manifest_hash,
                    "world_size": world,
                },
                directory / ckpt.STATE_FILE,
            )
        ckpt.save({"rng": ckpt.capture_rng_state(), **engine.rank_state()}, directory / ckpt.rank_file(rank))
        ray.train.report(
            _finite_only(metrics),
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=ckpt.checkpoint_dir_name(metrics["epoch"]),
        )


def final_evaluation(engine, best_weights, eval_splits, cfg: ExperimentConfig, device) -> dict:
    """The best epoch's weights scored on every evaluation split (all workers take part)."""
    if best_weights is not None:
        engine.module.load_state_dict(best_weights)
    final = {}
    for split in eval_splits:
        summary = evaluate_split(engine, ray.train.get_dataset_shard(split), cfg, device)
        final[_split_role(split, cfg)] = summary
    return final


@contextlib.contextmanager
def checkpoint_to_resume(run_dir, rank: int = 0):
    """A local directory holding the checkpoint to resume from (None: start afresh).

    The newest checkpoint in the run folder whose files all read back (checkpoint.
    resume_candidates: it may be newer than the one Ray Train hands back). One that does not
    (torn by a crash, damaged in storage) is named and passed over for the one before it, so a
    bad checkpoint costs the epochs since the previous one, not the run; when none reads back,
    the run stops with every reason rather than start over. Checkpoints on a URI's file system
    are downloaded first. Every rank reads the same files, so all choose the same one."""
    registered = ray.train.get_checkpoint()
    candidates = ckpt.resume_candidates(run_dir)
    if not candidates:
        if registered is None:
            yield None
        else:  # a checkpoint Ray registered under a name not ours: taken as it is
            with registered.as_directory() as directory:
                yield Path(directory)
        return
    problems = []
    for candidate in candidates:
        with tempfile.TemporaryDirectory(prefix="fvae-resume-") as scratch:
            directory = download_dir(candidate, Path(scratch) / candidate.name)
            problem = ckpt.unreadable(directory, load_state=_load_checkpoint_file)
            if problem is None:
                yield directory
                return
        problem = problem.replace(str(directory), str(candidate))  # name the file where it is stored
        problems.append(problem)
        if rank == 0:
            sys.stdout.write(f"cannot resume from {candidate}: {problem}; trying the checkpoint before it\n")
    raise ConfigError(f"{run_dir}: no checkpoint can be resumed from ({'; '.join(problems)}). Move the damaged "
                      "checkpoint folders away to start this run afresh, or use another ray.run_name.")


def resume(directory: Path, engine, cfg: ExperimentConfig, manifest_hash: str, rank: int, world: int):
    saved = _load_checkpoint_file(directory / ckpt.STATE_FILE)
    ckpt.check_resumable(saved["config"], saved["manifest_hash"], config_to_dict(cfg), manifest_hash, str(directory))
    engine.module.load_state_dict(saved["model"])
    saved_world = int(saved.get("world_size", 0))
    rank_paths = [directory / ckpt.rank_file(r) for r in range(saved_world)]
    missing = ckpt.missing_rank_files(directory, saved_world)
    if missing:
        raise ConfigError(f"{directory}: incomplete checkpoint, missing {missing}")
    # every rank's file only when the optimizer state is sharded; else just this rank's RNG
    wanted = rank_paths if engine.sharded_optimizer else rank_paths[rank : rank + 1]
    rank_states = [_load_checkpoint_file(path) for path in wanted]
    engine.load_state(saved, rank_states)
    own = _load_checkpoint_file(rank_paths[rank]) if saved_world == world else None
    state = TrainState(**saved["train_state"])
    # the patience in force now decides (a rerun may raise it to train on)
    patience = cfg.train.early_stopping_patience
    state.stopped_early = patience > 0 and state.bad_epochs >= patience
    if own is not None and saved.get("world_size") == world:
        ckpt.restore_rng_state(own["rng"])
    else:
        seed_everything(cfg.train.seed + 1 + rank + 7919 * state.epoch)
    return state, saved.get("best_model")


def write_metrics(run_dir, state: TrainState, manifest_hash: str, final: dict | None = None) -> None:
    """<run>/metrics.json: per-epoch history, best epoch, final valid/test metrics (rank 0)."""
    path = run_dir / METRICS_FILE
    previous = read_json(path) or {}
    document = {
        "manifest_hash": manifest_hash,
        "epochs_completed": state.epoch,
        "best_epoch": state.best_epoch,
        "best_valid_rank_ic": state.best_score if state.best_epoch is not None else None,
        "best_checkpoint": ckpt.checkpoint_dir_name(state.best_epoch) if state.best_epoch is not None else None,
        "stopped_early": state.stopped_early,
        "history": state.history,
        "final": final if final is not None else previous.get("final"),
    }
    write_text_atomic(path, json.dumps(json_safe(document), indent=1))


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def intra_op_threads(cfg: ExperimentConfig) -> int:
    """torch's intra-op threads per worker: train.torch_threads, else the worker's whole CPUs."""
    return cfg.train.torch_threads or max(1, int(cfg.ray.cpus_per_worker))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def quiet_ray_train_logs(level: str) -> None:
    """Apply ray.log_level to Ray Train's loggers in this worker.

    Ray 2.60's LoggingConfig misses some of them: the per-report INFO line comes from a logger
    named by its file path (.../ray/train/v2/.../context.py) that propagates to the root logger."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (name.startswith("ray.train") or "/ray/train/" in name):
            logger.setLevel(level.upper())


def _default_builder(model_cfg):
    from fvae_dist.models.registry import build_model

    return build_model(model_cfg)


class LockstepBatches:
    """This worker's batches for as long as every worker still has one.

    DDP's gradient all-reduce hangs unless every worker runs the same number of steps. Ray Train
    hands the training data out through streaming_split(equal=True), which equalises ROWS, and a
    row is a block of up to data.days_per_block consecutive days (data/day_blocks.py): a shard's
    last block is shorter and days without a sample are left out, so two workers' shares can
    differ by a few days, and their step counts with them. So every step each worker publishes
    whether it still has a batch (a MIN all-reduce over the process group) and all stop when the
    first runs out; at most a few of the longer share's days are left out of that epoch
    (tests/train/test_train_run.py: unequal shares). The flag for batch k+1 is sent before batch
    k is handed out, so its exchange overlaps step k instead of sitting between steps.
    `wait_seconds`: time spent fetching batches (the data wait), flags not included."""

    def __init__(self, batches, world: int, device):
        self._batches, self._world = batches, world
        self._device = device
        self.wait_seconds = 0.0

    def __iter__(self):
        batch = self._fetch()
        if self._world == 1:
            while batch is not None:
                yield batch
                batch = self._fetch()
            return
        pending = self._send_flag(batch is not None)
        while self._all_have(pending):
            following = self._fetch()
            pending = self._send_flag(following is not None)  # overlaps the step on `batch`
            yield batch
            batch = following

    def _fetch(self):
        started = time.perf_counter()
        batch = next(self._batches, None)
        self.wait_seconds += time.perf_counter() - started
        return batch

    def _send_flag(self, have: bool):
        flag = torch.tensor([1 if have else 0], dtype=torch.int32, device=_collective_device(self._device))
        return flag, dist.all_reduce(flag, op=dist.ReduceOp.MIN, async_op=True)

    @staticmethod
    def _all_have(pending) -> bool:
        flag, work = pending
        work.wait()
        return bool(flag.item())


def _all_reduce_sum(values: torch.Tensor, device) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    values = values.to(_collective_device(device))
    dist.all_reduce(values)
    return values.cpu()


def _collective_device(device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _load_checkpoint_file(path: Path):
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return ckpt.load(path)


def _cpu_copy(state_dict: dict) -> dict:
    return {key: value.detach().to("cpu", copy=True).float() if value.is_floating_point() else value.detach().cpu().clone()
            for key, value in state_dict.items()}


def _split_role(split: str, cfg: ExperimentConfig) -> str:
    return {cfg.data.valid_split: "valid", cfg.data.test_split: "test"}.get(split, split)


def _finite_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v)) and v is not None}
