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
        # param group index -> the group's last fully checked rows. Checking every tensor of
        # every row costs 0.09 ms a step for FactorVAE's 29 parameters; rows whose group, state
        # and parameter storage are the same as last time need only their new gradients checked.
        self._checked: dict[int, _Rows] = {}

    def step(self, max_norm: float) -> bool:
        """Clip the gradients to total norm max_norm (0: no clipping) and take AdamW's step.
        False, with nothing changed, when this step is torch's to take (module docstring)."""
        groups = [self._rows(index, group) for index, group in enumerate(self.optimizer.param_groups)]
        if any(rows is None for rows in groups):
            return False
        grads = [g for rows in groups for g in rows.grads]
        scale = 1.0
        if max_norm > 0 and grads:
            norm = math.sqrt(self.lib.fvae_sum_of_squares(len(grads), _pointers(grads), _sizes(grads)))
            if not math.isfinite(norm):
                return False
            scale = min(1.0, max_norm / (norm + 1e-6))  # torch's clip coefficient
        for group, rows in zip(self.optimizer.param_groups, groups):
            if not rows.params:
                continue
            beta1, beta2 = group["betas"]
            params, exp_avgs, exp_avg_sqs, steps, sizes = rows.state_pointers()
            self.lib.fvae_adamw_step(len(rows.params), params, _pointers(rows.grads), exp_avgs, exp_avg_sqs, steps,
                                     sizes, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                                     float(group["weight_decay"]), scale)
        return True

    def _rows(self, index: int, group: dict) -> _Rows | None:
        """The group's parameters that have a gradient, with their state, or None when the
        kernels cannot step this group."""
        if group["amsgrad"] or group["maximize"] or group.get("capturable") or group.get("differentiable") \
                or isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
            return None
        params = group["params"]
        grads = [p.grad for p in params]
        checked = self._checked.get(index)
        if checked is not None and checked.still_holds(group, self.optimizer.state, grads):
            return checked.with_grads(grads)
        rows = _Rows(group, self.optimizer.state)
        for p in params:
            if p.grad is None:
                continue
            state = self.optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                return None                                            # torch initialises the state
            row = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
            if not all(_plain(t) for t in row) or state["step"].numel() != 1:
                return None
            rows.append(*row)
        if len(rows.params) == len(params):
            self._checked[index] = rows
        return rows


class _Rows:
    """One param group's tensors for the kernels, column by column, with the group and the
    optimizer state they were checked against."""

    def __init__(self, group: dict, state: dict):
        self.group, self.state, self.group_params = group, state, group["params"]
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps = [], [], [], [], []
        self._state_pointers = None

    def append(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor) -> None:
        for column, tensor in zip((self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps),
                                  (param, grad, exp_avg, exp_avg_sq, step)):
            column.append(tensor)

    def still_holds(self, group: dict, state: dict, grads: list) -> bool:
        """Whether these rows (every parameter of the group) are still the group's and the
        state's, each parameter in the same storage, and the new gradients are ones the kernels
        take. optimizer.load_state_dict replaces the groups and the state; p.data = ... moves a
        parameter."""
        return (group is self.group and state is self.state and group["params"] is self.group_params
                and len(grads) == len(self.params)
                and all(g is not None and _plain(g) for g in grads)
                and all(p is q and p.data_ptr() == ptr for p, q, ptr in
                        zip(self.group_params, self.params, self.state_pointers()[0])))

    def with_grads(self, grads: list) -> _Rows:
        self.grads = grads
        return self

    def state_pointers(self):
        """ctypes arrays of the columns that stay put from step to step: params, exp_avgs,
        exp_avg_sqs, steps and the sizes (the gradients are new tensors every step)."""
        if self._state_pointers is None:
            self._state_pointers = (_pointers(self.params), _pointers(self.exp_avgs), _pointers(self.exp_avg_sqs),
                                    _pointers(self.steps), _sizes(self.params))
        return self._state_pointers


def _plain(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous()


def _pointers(tensors: list[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _sizes(tensors: list[Tensor]):
    return (ctypes.c_long * len(tensors))(*[t.numel() for t in tensors])
