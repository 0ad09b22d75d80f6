"""AdamW's step after gradient clipping, on CPU in two native passes (native/adamw.cpp).

The same arithmetic as torch.nn.utils.clip_grad_norm_ followed by torch.optim.AdamW(fused=True)'s
step, on that optimizer's own state tensors (exp_avg, exp_avg_sq, step): optimizer.state_dict(),
checkpoints and any later torch step see no difference. One pass sums the squared gradients of
all tensors, one updates every tensor (the clipping coefficient folded into the gradient).

Why: around their arithmetic, clip_grad_norm_ (a norm op per tensor) and the optimizer's Python
step (state lookups, grouping by device and dtype, a step-counter op per tensor) cost 0.76 ms of
FactorVAE's 12-13 ms CPU training step, measured in the step; the native passes 0.13 ms.

A step it does not handle is left to torch, which then does exactly what it always did: the
first one (torch creates the state), a non-float32, non-contiguous or non-CPU tensor, amsgrad,
maximize, a tensor learning rate, or a gradient norm that is not finite (torch's clipping then
turns every gradient into NaN, as it would have)."""
from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor


class NativeAdamW:
    """Clip-and-step for one torch.optim.AdamW through the native kernels `lib`."""

    def __init__(self, optimizer: torch.optim.AdamW, lib: ctypes.CDLL):
        if not isinstance(optimizer, torch.optim.AdamW):
            raise TypeError(f"NativeAdamW steps a torch.optim.AdamW, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.lib = lib

    def step(self, max_norm: float) -> bool:
        """Clip the gradients to total norm max_norm (0: no clipping) and take AdamW's step.
        False, with nothing changed, when this step is torch's to take (module docstring)."""
        groups = [self._tensors(group) for group in self.optimizer.param_groups]
        if any(tensors is None for tensors in groups):
            return False
        grads = [g for tensors in groups for g in tensors[1]]
        scale = 1.0
        if max_norm > 0 and grads:
            norm = math.sqrt(self.lib.fvae_sum_of_squares(len(grads), _pointers(grads), _sizes(grads)))
            if not math.isfinite(norm):
                return False
            scale = min(1.0, max_norm / (norm + 1e-6))  # torch's clip coefficient
        for group, (params, grads, exp_avgs, exp_avg_sqs, steps) in zip(self.optimizer.param_groups, groups):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            self.lib.fvae_adamw_step(len(params), _pointers(params), _pointers(grads), _pointers(exp_avgs),
                                     _pointers(exp_avg_sqs), _pointers(steps), _sizes(params), float(group["lr"]),
                                     float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                                     scale)
        return True

    def _tensors(self, group: dict):
        """(params, grads, exp_avgs, exp_avg_sqs, steps) of the group's parameters that have a
        gradient, or None when the kernels cannot step this group."""
        if group["amsgrad"] or group["maximize"] or group.get("capturable") or group.get("differentiable") \
                or isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
            return None
        tensors = ([], [], [], [], [])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                return None                                            # torch initialises the state
            row = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
            if not all(_plain(t) for t in row) or state["step"].numel() != 1:
                return None
            for column, tensor in zip(tensors, row):
                column.append(tensor)
        return tensors


def _plain(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous()


def _pointers(tensors: list[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _sizes(tensors: list[Tensor]):
    return (ctypes.c_long * len(tensors))(*[t.numel() for t in tensors])
