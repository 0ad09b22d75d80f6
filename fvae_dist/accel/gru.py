"""CPUGRU: torch.nn.GRU whose float32 CPU time loop runs in one C++ call per layer.

    accel.prepare_model(model, "auto", device)   swaps every plain nn.GRU of a built model for it

Same class hierarchy (a subclass of nn.GRU), same parameters, state_dict and function; only the
arithmetic of the time loop is arranged differently (accel/gru_loop.cpp says how). The fast path
runs for a batch-first, unidirectional GRU with biases, no initial state and float32 CPU
parameters, outside bf16/fp16 autocast; anything else (CUDA, bf16, an initial state) is handled
by nn.GRU itself, so swapping is always safe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvae_dist.accel.extension import load_gru_loop


class CPUGRU(nn.GRU):
    """nn.GRU with the fused float32 CPU time loop (see the module docstring)."""

    def forward(self, input, hx=None):  # noqa: A002 (nn.GRU's own argument name)
        loop = load_gru_loop() if self._fast_path_applies(input, hx) else None
        if loop is None:
            return super().forward(input, hx)
        layer_input, time_major = input, False
        last_states = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            weights = [getattr(self, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            states, last = _GRULayer.apply(layer_input, *weights, time_major, loop)
            layer_input, time_major = states, True                     # (T, S, H) feeds the next layer
            last_states.append(last)
        return layer_input.transpose(0, 1), torch.stack(last_states)   # (S, T, H), (num_layers, S, H)

    def _fast_path_applies(self, input, hx) -> bool:
        return (
            hx is None and self.batch_first and not self.bidirectional and self.bias and self.proj_size == 0
            and isinstance(input, Tensor) and input.dim() == 3 and input.device.type == "cpu"
            and input.dtype == torch.float32 and input.shape[0] > 0 and input.shape[1] > 0
            and not torch.is_autocast_enabled("cpu")
            and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in self._flat_weights)
        )


class _GRULayer(torch.autograd.Function):
    """One layer over a whole sequence: x (S, T, I) batch-first, or (T, S, I) when time_major
    (a lower layer's states). Returns (states (T, S, H), last state (S, H))."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, time_major: bool, loop):
        H = w_hh.shape[1]
        # r and z only see gi + gh, so b_hh's r and z parts join gi's bias; b_hn is multiplied by r
        b_gi = torch.cat([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H :]]).detach().contiguous()
        b_hn = b_hh[2 * H :].detach().contiguous()
        x, w_ih, w_hh = x.detach().contiguous(), w_ih.detach().contiguous(), w_hh.detach().contiguous()
        states, saved = loop.forward(x, w_ih, w_hh, b_gi, b_hn, time_major)   # (T+1, S, H), (T, 4, S, H)
        ctx.save_for_backward(x, w_ih, w_hh, states, saved)
        ctx.time_major, ctx.loop = time_major, loop
        ctx.set_materialize_grads(False)
        T = states.shape[0] - 1
        return states[1:], states[T].clone()

    @staticmethod
    def backward(ctx, grad_states, grad_last):
        x, w_ih, w_hh, states, saved = ctx.saved_tensors
        dh_last = grad_last.float().contiguous() if grad_last is not None else None
        dh_out = grad_states.float().contiguous() if grad_states is not None else None   # (T, S, H)
        dx, dw_ih, dw_hh, db = ctx.loop.backward(x, w_ih, w_hh, states, saved, dh_last, dh_out, ctx.time_major,
                                                 ctx.needs_input_grad[0])
        H = w_hh.shape[1]
        db_ih = db[: 3 * H]                                            # d_r, d_z, d_n
        db_hh = torch.cat([db[: 2 * H], db[3 * H :]])                  # d_r, d_z, d_n * r
        return (dx if ctx.needs_input_grad[0] else None), dw_ih, dw_hh, db_ih, db_hh, None, None


def swap_grus(model: nn.Module) -> int:
    """Turn every plain nn.GRU inside `model` into a CPUGRU in place; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.GRU:
            module.__class__ = CPUGRU
            swapped += 1
    return swapped
