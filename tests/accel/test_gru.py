"""accel/gru.py and accel/gru_loop.cpp: CPUGRU against torch.nn.GRU, and the extension's checks.

CI machines have a C++ compiler and ninja, so the extension must build there: a test that finds it
unavailable fails rather than silently testing nn.GRU against itself."""
from __future__ import annotations

import pytest
import torch

from fvae_dist.accel.extension import load_gru_loop, why_unavailable
from fvae_dist.accel.gru import CPUGRU, swap_grus


@pytest.fixture(scope="module")
def loop():
    reason = why_unavailable()
    assert reason is None, f"the GRU loop cannot be built on this machine: {reason}"
    module = load_gru_loop()
    assert module is not None, "the GRU loop extension failed to build (see the RuntimeWarning)"
    return module


def _pair(input_size, hidden, layers=1, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    reference = torch.nn.GRU(input_size, hidden, num_layers=layers, dropout=dropout, batch_first=True)
    fast = torch.nn.GRU(input_size, hidden, num_layers=layers, dropout=dropout, batch_first=True)
    fast.load_state_dict(reference.state_dict())
    assert swap_grus(fast) == 1 and type(fast) is CPUGRU
    return reference, fast


def _run(gru, x, use_sequence: bool, autocast: bool = False):
    """Outputs and every gradient of a loss reading the last state (and the whole output
    sequence when use_sequence), so both backward inputs are exercised."""
    x = x.clone().requires_grad_(True)
    gru.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output, h_n = gru(x)
    loss = h_n[-1].float().square().sum()
    if use_sequence:
        weights = torch.linspace(-1, 1, output.numel()).reshape(output.shape)
        loss = loss + (output.float() * weights).sum()
    loss.backward()
    return [output.detach().float(), h_n.detach().float(), x.grad] + [p.grad.clone() for p in gru.parameters()]


def _relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("shape", [(300, 20, 64, 64, 1), (7, 1, 5, 3, 1), (13, 4, 6, 8, 2), (1, 3, 2, 2, 3)])
@pytest.mark.parametrize("use_sequence", [False, True])
def test_fp32_outputs_and_gradients_match_torch(loop, monkeypatch, shape, use_sequence):
    stocks, steps, inputs, hidden, layers = shape
    reference, fast = _pair(inputs, hidden, layers)
    calls = []
    original = loop.forward
    monkeypatch.setattr(loop, "forward", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(stocks, steps, inputs)
    expected, got = _run(reference, x, use_sequence), _run(fast, x, use_sequence)
    names = ["output", "h_n", "dx"] + [n for n, _ in fast.named_parameters()]
    for name, a, b in zip(names, got, expected):
        assert a.shape == b.shape, name
        assert _relative_error(a, b) < 1e-5, name
    assert len(calls) == layers, "the time loop did not run in the extension"


def test_two_threads_still_match_torch(loop):
    reference, fast = _pair(16, 32)
    x = torch.randn(64, 6, 16)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _run(fast, x, use_sequence=True)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(two, _run(reference, x, use_sequence=True)):
        assert _relative_error(a, b) < 1e-5


def test_bf16_autocast_and_an_initial_state_fall_through_to_torch(loop, monkeypatch):
    reference, fast = _pair(8, 8)
    monkeypatch.setattr(loop, "forward", lambda *args: pytest.fail("the extension ran under bf16 autocast"))
    x = torch.randn(5, 4, 8)
    for a, b in zip(_run(fast, x, True, autocast=True), _run(reference, x, True, autocast=True)):
        torch.testing.assert_close(a, b)
    h0 = torch.randn(1, 5, 8)
    torch.testing.assert_close(fast(x, h0)[1], reference(x, h0)[1])


def test_padding_rows_do_not_change_the_real_rows(loop):
    """Each sequence is independent: the property the models' padding invariance rests on."""
    _, fast = _pair(6, 8)
    x = torch.randn(5, 4, 6)
    torch.testing.assert_close(fast(x[:2])[1], fast(x)[1][:, :2], rtol=1e-5, atol=1e-6)


def test_a_wrong_call_is_refused_naming_the_argument(loop):
    x = torch.randn(5, 4, 6)
    w_ih, w_hh = torch.randn(24, 6), torch.randn(24, 8)
    b_gi, b_hn = torch.zeros(24), torch.zeros(8)
    with pytest.raises(RuntimeError, match="w_ih must have shape"):
        loop.forward(x, torch.randn(24, 7), w_hh, b_gi, b_hn, False)
    with pytest.raises(RuntimeError, match="x must be float32"):
        loop.forward(x.double(), w_ih, w_hh, b_gi, b_hn, False)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        loop.forward(x.transpose(0, 1), w_ih, w_hh, b_gi, b_hn, True)
    with pytest.raises(RuntimeError, match="b_hn must have shape"):
        loop.forward(x, w_ih, w_hh, b_gi, torch.zeros(9), False)
    states, saved = loop.forward(x, w_ih, w_hh, b_gi, b_hn, False)
    with pytest.raises(RuntimeError, match="dh_out must have shape"):
        loop.backward(x, w_ih, w_hh, states, saved, None, torch.zeros(4, 5, 9), False, True)


def test_swapped_model_trains_like_the_reference(loop):
    """FactorVAE with its GRU swapped: the same loss and gradients as the model as written."""
    from fvae_dist.models import FactorVAE, FactorVAEConfig

    torch.manual_seed(0)
    cfg = FactorVAEConfig(num_features=6, hidden_size=16, num_factors=3, num_portfolios=8)
    reference = FactorVAE(cfg).eval()
    fast = FactorVAE(cfg).eval()
    fast.load_state_dict(reference.state_dict())
    assert swap_grus(fast) == 1
    x, mask, y = torch.randn(2, 30, 20, 6), torch.ones(2, 30, dtype=torch.bool), torch.randn(2, 30)
    mask[1, 25:] = False
    losses = []
    for model in (reference, fast):
        out = model(x, mask, y)
        out["loss"].backward()
        losses.append(out["loss"].detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    # on the scale of the largest gradient: some are analytically 0 (the portfolio logits' bias,
    # a softmax shift) and hold only rounding noise
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    for (name, a), b in zip(fast.named_parameters(), reference.parameters()):
        assert float((a.grad - b.grad).abs().max()) <= 1e-4 * scale, name


@pytest.mark.timeout(300)
def test_a_build_lock_left_by_a_killed_builder_does_not_block_loading(loop):
    """torch's build lock is a plain file its builder deletes when done; a builder killed midway
    leaves it and torch would wait for it forever. The loader holds its own flock (released when
    its holder dies) and clears such a file (accel/extension.py: exclusive_build)."""
    from torch.utils.cpp_extension import get_default_build_root

    from fvae_dist.accel.extension import build_name

    stale = get_default_build_root() + f"/{build_name()}/lock"
    open(stale, "w").close()
    load_gru_loop.cache_clear()
    try:
        assert load_gru_loop() is not None
    finally:
        load_gru_loop.cache_clear()
    import os

    assert not os.path.exists(stale)
