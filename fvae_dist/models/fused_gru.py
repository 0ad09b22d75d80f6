"""FusedGRU: torch.nn.GRU with a faster CPU path for training (eq. 4's GRU, and the baselines').

Same parameters (weight_ih_l0, ...), same state_dict, same function; only the CPU arithmetic is
arranged differently. Per layer:

    for t = 1..T:
        gi = x_t W_ih^T                    (S, I) x (I, 3H)
        gh = h_{t-1} W_hh^T                (S, H) x (H, 3H)
        r, z, n, h_t = gates(gi, gh, b)    native/gru_cell.cpp, one pass over (S, 3H), biases added
and backward by hand, from t = T down: one fused gate-gradient pass (which also sums the bias
gradients), then dx_t = dgi_t W_ih, the recurrence dgh_t W_hh, and the weight gradients added
up step by step (dW_ih += dgi_t^T x_t, dW_hh += dgh_t^T h_{t-1}).

In fp32 that whole loop, products included, runs in native code (gru_cell.cpp's
fvae_gru_forward_f32 / fvae_gru_backward_f32) through the sgemm of torch's own BLAS
(native/build.py, torch_sgemm). Otherwise (bf16, or no such BLAS) the loop runs here in Python:
gi as one (S*T, I) x (I, 3H) product, a torch product and a native gate kernel per step, and
backward's dx and weight gradients as (S*T)-row products after the loop. Measured on one core,
237 stocks, T=20, H=64, fp32 forward + backward: torch.nn.GRU 11.5 ms, the Python loop 8.8 ms,
the native loop 7.8 ms (bench_train.py's "gru_kernels" times all three).

Why: torch's CPU GRU runs every gate's sigmoid/tanh/add/multiply as its own tensor op, forward
and, through autograd, backward (about 30 ops per time step); at FactorVAE's size (S=300 stocks,
T=20, H=64) that bookkeeping costs as much as the products themselves. The native loop also
drops the Python and dispatch cost of 40 small products a step, and its step-sized products
keep their operands in cache (100-104 GFLOP/s on one core, where the Python loop's (S*T)-row
products reach 86-95).

Mixed precision: under CPU bf16 autocast the products run in bfloat16 (as autocast would run
them) while the gates, the hidden state and the gradients carried between steps stay float32.

The fused path is taken on CPU for a batch_first, unidirectional GRU with biases, no initial
state and float32 parameters, when the native kernels are available (native/build.py); anything
else, CUDA included, runs torch.nn.GRU itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvae_dist.native.build import load_gru_kernels, torch_sgemm


class FusedGRU(nn.GRU):
    """A drop-in torch.nn.GRU (batch_first=True) with the fused CPU path described above."""

    native_time_loop = True
    """fp32: run the time loop in native code when torch's BLAS is found. False on an instance
    keeps it in Python (the benchmark and the tests compare both)."""

    def forward(self, input, hx=None):  # noqa: A002 (nn.GRU's own argument name)
        kernels = self._fused_kernels(input, hx)
        if kernels is None:
            return super().forward(input, hx)
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        sgemm = torch_sgemm() if self.native_time_loop and not bf16 and input.dtype == torch.float32 else None
        layer_input, time_major = input, False
        last_states = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            weights = [getattr(self, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            states, last = _GRULayer.apply(layer_input, *weights, time_major, bf16, kernels, sgemm)
            layer_input, time_major = states, True                     # (T, S, H) feeds the next layer
            last_states.append(last)
        output = layer_input.transpose(0, 1)                           # (S, T, H), batch_first
        return output, torch.stack(last_states)                        # (num_layers, S, H)

    def _fused_kernels(self, input, hx):
        fused = (
            hx is None and self.batch_first and not self.bidirectional and self.bias and self.proj_size == 0
            and isinstance(input, Tensor) and input.dim() == 3 and input.device.type == "cpu"
            and input.shape[0] > 0 and input.shape[1] > 0
            and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in self._flat_weights)
        )
        return load_gru_kernels() if fused else None


class _GRULayer(torch.autograd.Function):
    """One GRU layer over a whole sequence. Returns (states (T, S, H), last state (S, H)).

    x is (S, T, I) batch-first, or (T, S, I) when time_major (a lower layer's states).
    Two ways to run it (module docstring): with sgemm (the address of torch's BLAS sgemm, fp32
    only) the whole time loop runs in native code; with None, the loop runs here in Python, one
    native kernel and one torch product a step."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, time_major: bool, bf16: bool, kernels, sgemm: int | None):
        with torch.autocast("cpu", enabled=False):
            T, S = (x.shape[0], x.shape[1]) if time_major else (x.shape[1], x.shape[0])
            H = w_hh.shape[1]
            # The kernels add the biases. r and z only see gi + gh, so b_hh's r and z parts join
            # gi's bias; b_hn stays apart, it is multiplied by r.
            b_gi = torch.cat([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H :]]).detach().float().contiguous()
            b_hn = b_hh[2 * H :].detach().float().contiguous()
            if sgemm is not None:
                saved, states = _forward_whole_sequence(x, w_ih, w_hh, b_gi, b_hn, T, S, time_major, sgemm, kernels)
            else:
                saved, states = _forward_step_by_step(x, w_ih, w_hh, b_gi, b_hn, T, S, time_major, bf16, kernels)
        ctx.save_for_backward(*saved)
        ctx.shape, ctx.time_major, ctx.bf16, ctx.kernels, ctx.sgemm = (T, S, H), time_major, bf16, kernels, sgemm
        ctx.x_dtype = x.dtype
        ctx.set_materialize_grads(False)
        return states[1:], states[T].clone()

    @staticmethod
    def backward(ctx, grad_states, grad_last):
        if ctx.sgemm is not None:
            grads = _backward_whole_sequence(ctx, grad_states, grad_last)
        else:
            grads = _backward_step_by_step(ctx, grad_states, grad_last)
        return (*grads, None, None, None, None)


def _row_strides(width: int, T: int, S: int, time_major: bool) -> tuple[int, int]:
    """Rows of `width` values, one per (s, t) pair, s * T + t batch-first or t * S + s
    time-major: (elements between stock s's rows, elements between time step t's rows)."""
    return (width, S * width) if time_major else (T * width, width)


def _x_strides(x: Tensor, T: int, S: int, time_major: bool) -> tuple[int, int]:
    """(x_s, x_t) of the layer input x, as gru_cell.cpp's Sequence takes them."""
    return _row_strides(x.shape[-1], T, S, time_major)


def _forward_whole_sequence(x, w_ih, w_hh, b_gi, b_hn, T, S, time_major, sgemm, kernels):
    """fp32: the whole time loop in native code (gru_cell.cpp, fvae_gru_forward_f32)."""
    H, I = w_hh.shape[1], x.shape[-1]
    x, w_ih, w_hh = x.contiguous(), w_ih.detach().contiguous(), w_hh.detach().contiguous()
    states = x.new_empty((T + 1, S, H))                                # states[0] = h_0 = 0
    gates = x.new_empty((T, 4, S, H))                                  # r, z, n, gh_n per step
    work = x.new_empty(2 * S * 3 * H)                                  # one step's gi and gh
    kernels.fvae_gru_forward_f32(sgemm, S, T, H, I, x.data_ptr(), *_x_strides(x, T, S, time_major),
                                 w_ih.data_ptr(), w_hh.data_ptr(), b_gi.data_ptr(), b_hn.data_ptr(),
                                 states.data_ptr(), gates.data_ptr(), work.data_ptr())
    return (x, w_ih, w_hh, states, gates), states


def _backward_whole_sequence(ctx, grad_states, grad_last):
    x, w_ih, w_hh, states, gates = ctx.saved_tensors
    T, S, H = ctx.shape
    dh_last = grad_last.float().contiguous() if grad_last is not None else None
    dh_out = grad_states.float().contiguous() if grad_states is not None else None   # (T, S, H)
    dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
    dw_ih, dw_hh = torch.empty_like(w_ih), torch.empty_like(w_hh)
    db = states.new_empty(4 * H)                                       # d_r, d_z, d_n, d_n * r summed
    work = states.new_empty(2 * S * H + 2 * S * 3 * H + H)             # gru_cell.cpp: sequence_backward
    ctx.kernels.fvae_gru_backward_f32(ctx.sgemm, S, T, H, x.shape[-1], x.data_ptr(),
                                      *_x_strides(x, T, S, ctx.time_major), w_ih.data_ptr(), w_hh.data_ptr(),
                                      states.data_ptr(), gates.data_ptr(), _pointer(dh_last), _pointer(dh_out),
                                      _pointer(dx), dw_ih.data_ptr(), dw_hh.data_ptr(), db.data_ptr(),
                                      work.data_ptr())
    db_ih = db[: 3 * H]                                                # d_r, d_z, d_n
    db_hh = torch.cat([db[: 2 * H], db[3 * H :]])                      # d_r, d_z, d_n * r
    return dx, dw_ih, dw_hh, db_ih, db_hh


def _pointer(tensor: Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


def _forward_step_by_step(x, w_ih, w_hh, b_gi, b_hn, T, S, time_major, bf16, kernels):
    """Any precision: the time loop here, a torch product and a native gate kernel per step."""
    mm_dtype = torch.bfloat16 if bf16 else torch.float32
    H = w_hh.shape[1]
    x_mm = x.to(mm_dtype).contiguous()
    w_ih_mm, w_hh_mm = w_ih.to(mm_dtype), w_hh.to(mm_dtype)
    gi = torch.mm(x_mm.reshape(-1, x.shape[-1]), w_ih_mm.t())          # (S*T or T*S, 3H), no bias
    gi_step = _StepRows(gi, T, S, time_major)

    states = x.new_empty((T + 1, S, H), dtype=torch.float32)           # states[0] = h_0 = 0
    states[0].zero_()
    gates = x.new_empty((T, 4, S, H), dtype=torch.float32)             # r, z, n, gh_n per step
    gh = x.new_empty((S, 3 * H), dtype=mm_dtype)
    # The states as product operands: under bf16 the kernel also writes each h_t in bf16, for the
    # next step's product and for backward's weight gradient.
    states_mm = x.new_zeros((T + 1, S, H), dtype=mm_dtype) if bf16 else states
    forward_step = kernels.fvae_gru_forward_step_bf16 if bf16 else kernels.fvae_gru_forward_step_f32
    w_hh_t = w_hh_mm.t()
    # Per-step pointers by arithmetic: indexing tensors T times per call costs more than the
    # small kernels it feeds.
    state_ptr, gates_ptr, gh_ptr = _steps(states), _steps(gates), gh.data_ptr()
    state_mm_ptr = _steps(states_mm) if bf16 else (lambda t: None)
    states_mm_steps = states_mm.unbind(0)
    for t in range(T):
        if t == 0:
            gh.zero_()                                                 # h_0 = 0
        else:
            torch.mm(states_mm_steps[t], w_hh_t, out=gh)               # (S, 3H), bias-free
        forward_step(S, H, gi_step.pointer(t), gi_step.stride, gh_ptr, b_gi.data_ptr(), b_hn.data_ptr(),
                     state_ptr(t), state_ptr(t + 1), state_mm_ptr(t + 1), gates_ptr(t))
    return (x_mm, w_ih_mm, w_hh_mm, states, states_mm, gates), states


def _backward_step_by_step(ctx, grad_states, grad_last):
    x_mm, w_ih_mm, w_hh_mm, states, states_mm, gates = ctx.saved_tensors
    (T, S, H), bf16 = ctx.shape, ctx.bf16
    mm_dtype = w_hh_mm.dtype
    dh_carry = grad_last.float().clone(memory_format=torch.contiguous_format) if grad_last is not None \
        else states.new_zeros((S, H))
    if grad_states is not None:
        grad_states = grad_states.float().contiguous()                 # (T, S, H)
        out_row_ptr, out_stride = _steps(grad_states), H
    else:                                                              # one zero row, stride 0
        zero_row = states.new_zeros(H)
        out_row_ptr, out_stride = (lambda t: zero_row.data_ptr()), 0
    dgi = x_mm.new_empty((T * S, 3 * H), dtype=mm_dtype)               # laid out like gi
    dgi_step = _StepRows(dgi, T, S, ctx.time_major)
    dgh = x_mm.new_empty((T, S, 3 * H), dtype=mm_dtype)
    dh_mm = x_mm.new_zeros((S, H), dtype=mm_dtype)                     # dgh_{t+1} W_hh (0 after h_T)
    db = states.new_zeros(4 * H)                                       # sum of d_r, d_z, d_n, d_n * r
    backward_step = ctx.kernels.fvae_gru_backward_step_bf16 if bf16 else ctx.kernels.fvae_gru_backward_step_f32
    state_ptr, gates_ptr, dgh_ptr = _steps(states), _steps(gates), _steps(dgh)
    dh_carry_ptr, dh_mm_ptr, dgh_steps = dh_carry.data_ptr(), dh_mm.data_ptr(), dgh.unbind(0)
    for t in reversed(range(T)):
        backward_step(S, H, out_row_ptr(t), out_stride, dh_carry_ptr, dh_mm_ptr, gates_ptr(t), state_ptr(t),
                      dgi_step.pointer(t), dgi_step.stride, dgh_ptr(t), db.data_ptr())
        if t > 0:                                                      # h_0 is a constant
            torch.mm(dgh_steps[t], w_hh_mm, out=dh_mm)

    x_rows = x_mm.reshape(-1, x_mm.shape[-1])                          # (S*T, I), rows match dgi's
    dx = (dgi @ w_ih_mm).reshape(x_mm.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    dw_ih = (dgi.t() @ x_rows).float()                                 # (3H, I)
    db_ih = db[: 3 * H]                                                # d_r, d_z, d_n
    # gh_t = h_{t-1} W_hh^T for t >= 2 (h_0 = 0 adds nothing): one product over all those rows
    h_prev = states_mm[1:T].reshape(-1, H)                             # ((T-1)*S, H)
    dw_hh = (dgh[1:].reshape(-1, 3 * H).t() @ h_prev).float()          # (3H, H)
    db_hh = torch.cat([db[: 2 * H], db[3 * H :]])                      # d_r, d_z, d_n * r
    return dx, dw_ih, dw_hh, db_ih, db_hh


def _steps(tensor: Tensor):
    """t -> address of tensor[t] (tensor contiguous): per-step pointers without indexing."""
    base, step = tensor.data_ptr(), tensor[0].numel() * tensor.element_size()
    return lambda t: base + t * step


class _StepRows:
    """Where time step t's S rows of a (rows, 3H) gate matrix start, and their row stride: rows
    are (s, t) pairs in x's layout, s * T + t batch-first or t * S + s time-major."""

    def __init__(self, matrix: Tensor, T: int, S: int, time_major: bool):
        self.base = matrix.data_ptr()
        self.stride, step_stride = _row_strides(matrix.shape[1], T, S, time_major)  # elements
        self.step_offset = step_stride * matrix.element_size()         # bytes

    def pointer(self, t: int) -> int:
        return self.base + t * self.step_offset
