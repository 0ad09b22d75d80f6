"""One optimisation step, two ways: PyTorch DDP (default) or a DeepSpeed engine.

Both expose the same small surface to the loop: `module` (the bare FactorVAE, for evaluation
and checkpoints), `autocast()` (the forward-pass precision context), `train_step(x, mask, y, weight)`,
`set_lr(lr)` and the optimizer state split into a part every rank shares (saved once, by rank 0)
and a part that is the rank's own (ZeRO partitions).

Mixed precision is one switch, train.precision:
  fp32  no autocast
  bf16  torch.autocast(bfloat16) on CPU or CUDA (DeepSpeed: its bf16 mode, bf16 weights with
        fp32 master copies in the optimizer)
  fp16  torch.autocast(float16) with a dynamic GradScaler (CUDA only; DeepSpeed: its fp16 mode)
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from fvae_dist.config import ExperimentConfig
from fvae_dist.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def lr_factor(train, epoch: int) -> float:
    """Multiplier of train.lr in `epoch` (0-based): linear warm-up, then the schedule."""
    if epoch < train.warmup_epochs:
        return (epoch + 1) / (train.warmup_epochs + 1)
    after = epoch - train.warmup_epochs
    if train.lr_schedule == "cosine":
        span = max(train.epochs - train.warmup_epochs - 1, 1)
        progress = min(after / span, 1.0)
        cosine = 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())
        return train.lr_min_ratio + (1.0 - train.lr_min_ratio) * cosine
    if train.lr_schedule == "step":
        return train.lr_step_gamma ** (after // train.lr_step_epochs)
    return 1.0


def loss_inputs(x, mask, y, weight) -> tuple:
    """The model's forward arguments: a loss weight only when there is one (train.index_share),
    so models that take none (tests' own, any user's) train unchanged."""
    return (x, mask, y) if weight is None else (x, mask, y, weight)


def build_engine(model: nn.Module, cfg: ExperimentConfig, device: torch.device, world_size: int):
    if cfg.train.deepspeed:
        return DeepSpeedEngine(model, cfg, device)
    return DDPEngine(model, cfg, device, world_size)


class DDPEngine:
    """AdamW + optional autocast/GradScaler + gradient clipping, under DDP when world_size > 1."""

    sharded_optimizer = False

    def __init__(self, model: nn.Module, cfg: ExperimentConfig, device: torch.device, world_size: int):
        train = cfg.train
        if train.precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs CUDA workers (ray.use_gpu=true); on CPU use bf16")
        self.module = model.to(device)
        self.allreduce = "none"  # how gradients are averaged across workers (recorded in metrics)
        if world_size > 1:
            from ray.train.torch import prepare_model

            # DDP: broadcasts rank 0's initial weights and all-reduces gradients in backward
            # through the process group (gloo on CPU, NCCL on GPU).
            self.wrapped = prepare_model(model, move_to_device=False, parallel_strategy="ddp")
            self.allreduce = "process_group"
        else:
            self.wrapped = model
        # fused: one kernel over all parameters instead of a dozen small ops per tensor
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                           fused=device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        self.grad_clip = train.grad_clip
        self.autocast = functools.partial(
            torch.autocast,
            device_type=device.type,
            dtype=AUTOCAST_DTYPES.get(train.precision, torch.float32),
            enabled=train.precision != "fp32",
        )

    def train_step(self, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
                   weight: torch.Tensor | None = None) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.wrapped(*loss_inputs(x, mask, y, weight))
        self.scaler.scale(out["loss"]).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def shared_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def rank_state(self) -> dict:
        return {}

    def load_state(self, shared: dict, rank_states: list[dict]) -> None:
        self.optimizer.load_state_dict(shared["optimizer"])
        if shared.get("scaler"):
            self.scaler.load_state_dict(shared["scaler"])


class DeepSpeedEngine:
    """deepspeed.initialize over the process group Ray Train already set up (gloo or NCCL).

    ZeRO stage 0 keeps the optimizer state replicated; stages 1-2 shard it, so every rank saves
    its own partition and a resume hands all partitions to DeepSpeed, which re-partitions them."""

    allreduce = "deepspeed"

    def __init__(self, model: nn.Module, cfg: ExperimentConfig, device: torch.device):
        import deepspeed

        train = cfg.train
        if train.precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 with DeepSpeed needs CUDA workers (ray.use_gpu=true)")
        self.sharded_optimizer = train.deepspeed_zero_stage > 0
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_days,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": train.deepspeed_zero_stage},
            "bf16": {"enabled": train.precision == "bf16"},
            "fp16": {"enabled": train.precision == "fp16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if train.grad_clip > 0:
            ds_config["gradient_clipping"] = train.grad_clip
        optimizer = torch.optim.AdamW(model.to(device).parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.module = self.engine.module
        # DeepSpeed casts the weights itself in bf16/fp16 mode; no autocast on top.
        self.autocast = contextlib.nullcontext

    def train_step(self, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
                   weight: torch.Tensor | None = None) -> dict:
        out = self.engine(*loss_inputs(x, mask, y, weight))
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def shared_state(self) -> dict:
        return {} if self.sharded_optimizer else {"optimizer": self.optimizer.state_dict()}

    def rank_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()} if self.sharded_optimizer else {}

    def load_state(self, shared: dict, rank_states: list[dict]) -> None:
        if not self.sharded_optimizer:
            if "optimizer" not in shared:
                raise ConfigError("checkpoint has no DeepSpeed optimizer state; resume with the "
                                  "train.deepspeed_zero_stage the run had")
            self.optimizer.load_state_dict(shared["optimizer"])
            return
        partitions = [state.get("optimizer") for state in rank_states]
        if not partitions or any(p is None for p in partitions):
            raise ConfigError("checkpoint lacks the ZeRO optimizer partitions; resume with the "
                              "train.deepspeed_zero_stage the run had")
        # ZeRO re-partitions the saved partitions (of any worker count) onto this worker group;
        # the fp32 master weights come from the checkpoint, not from the bf16 model copy.
        self.optimizer.load_state_dict(partitions, load_from_fp32_weights=True)


def deepspeed_safe_globals() -> list:
    """Classes a ZeRO optimizer state holds besides tensors, allowed for weights_only loading."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
