"""The "compile" path: SFM's time loop through torch.compile (inductor), the maintained compiler.

    accel.prepare_model(model, "auto", device)   gives every SFM of a built model a compiled loop

Why SFM only: its loop is a chain of about fifteen elementwise operations a step over (stocks,
H, K) tensors, which eager torch writes to memory one by one and inductor fuses into a few C++
loops. Measured on one CPU thread (fp32, training step, the grid's sizes: H = 64, K = 10, T = 20;
2026-12-07): 1,330 -> 420 ms at 2,133 stocks (3.2x), 950 -> 350 ms at 1,800, 1,530 -> 490 ms at
2,600, with one compilation for every size (dynamic shapes), about 50 s of CPU in a fresh process
(inductor's on-disk cache shortens later ones). The same compiler made the Transformer baseline
1.7x slower and left ALSTM unchanged (its LSTM is one opaque operator); FactorVAE and the GRU
baselines have the "gru" path. docs/benchmarks.md keeps the figures.

The parameters, the state_dict and the function are the SFM's own (models/baselines/sfm.py's
sfm_recurrence): only the arithmetic is fused, so results match eager to float32 rounding, not
bit for bit. The recurrent dropout masks are drawn outside the compiled function, from torch's
generator, as in eager. If compiling fails (a machine without a C++ compiler), the model warns
once and runs the eager loop.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn


def compile_sfm_loops(model: nn.Module) -> int:
    """Give every SFM inside `model` the compiled time loop, in place; returns how many."""
    from fvae_dist.models.baselines.sfm import SFMBaseline, sfm_recurrence

    compiled = 0
    for module in model.modules():
        if isinstance(module, SFMBaseline):
            module.recurrence = _CompiledOrEager(_compiled_sfm_recurrence(), sfm_recurrence)
            compiled += 1
    return compiled


@functools.cache
def _compiled_sfm_recurrence():
    from fvae_dist.models.baselines.sfm import sfm_recurrence

    # dynamic: a day's stock count changes every step; one graph serves them all
    return torch.compile(sfm_recurrence, dynamic=True)


class _CompiledOrEager:
    """Calls the compiled loop; if compiling fails, warns once and calls the eager one from then on.
    An error the eager loop raises too (bad input) is raised as the eager loop raises it."""

    def __init__(self, compiled, eager):
        self.compiled, self.eager = compiled, eager

    def __call__(self, *args):
        if self.compiled is None:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 (inductor raises many kinds; eager decides below)
            result = self.eager(*args)
            warnings.warn(f"train.cpu_kernels: compiling SFM's loop failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); running it eagerly", RuntimeWarning,
                          stacklevel=2)
            self.compiled = None
            return result
