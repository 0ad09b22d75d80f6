"""models/fused_gru.py and native/: the fused CPU GRU against torch.nn.GRU."""
from __future__ import annotations

import shutil
import threading

import pytest
import torch

from fvae_dist.models import fused_gru
from fvae_dist.models.fused_gru import FusedGRU
from fvae_dist.native import build
from tests.models.conftest import record_calls

HAS_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


def _pair(input_size, hidden, layers=1, dropout=0.0, seed=0, native_time_loop=True):
    torch.manual_seed(seed)
    reference = torch.nn.GRU(input_size, hidden, num_layers=layers, dropout=dropout, batch_first=True)
    fused = FusedGRU(input_size, hidden, num_layers=layers, dropout=dropout, batch_first=True)
    fused.load_state_dict(reference.state_dict())
    fused.native_time_loop = native_time_loop
    return reference, fused


def _run(gru, x, use_sequence: bool, autocast: bool = False):
    """Outputs and every gradient of a loss that reads the last state (and the whole output
    sequence when use_sequence), so both backward entry points are exercised."""
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


def test_the_fused_kernels_build_on_a_machine_with_a_compiler():
    if HAS_COMPILER:
        assert build.load_gru_kernels() is not None
    else:  # the models still work, on torch.nn.GRU
        with pytest.warns(RuntimeWarning, match="unavailable"):
            assert build._build_and_load(build.LIBRARIES["gru"]) is None


@pytest.mark.parametrize("shape", [(300, 20, 64, 64, 1), (7, 1, 5, 3, 1), (13, 4, 6, 8, 2), (1, 3, 2, 2, 3)])
@pytest.mark.parametrize("use_sequence", [False, True])
@pytest.mark.parametrize("native_time_loop", [True, False], ids=["native-loop", "python-loop"])
def test_fp32_outputs_and_gradients_match_torch(one_thread, monkeypatch, shape, use_sequence, native_time_loop):
    stocks, steps, inputs, hidden, layers = shape
    reference, fused = _pair(inputs, hidden, layers, native_time_loop=native_time_loop)
    calls = record_calls(monkeypatch, fused_gru, "_forward_whole_sequence", "_forward_step_by_step")
    x = torch.randn(stocks, steps, inputs)
    expected, got = _run(reference, x, use_sequence), _run(fused, x, use_sequence)
    for name, a, b in zip(["output", "h_n", "dx"] + [n for n, _ in fused.named_parameters()], got, expected):
        assert a.shape == b.shape, name
        assert _relative_error(a, b) < 1e-5, name
    ran = "_forward_whole_sequence" if native_time_loop and build.torch_sgemm() is not None else "_forward_step_by_step"
    assert calls == [ran] * layers, "the time loop ran somewhere other than expected"


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL may not export sgemm_")
def test_torchs_blas_is_found_where_torch_has_mkl():
    """The fast fp32 path depends on it: with torch's MKL build (x86, CI) it must not go missing."""
    assert build.torch_sgemm() is not None


def test_the_native_loop_matches_torch_with_two_threads():
    """With two threads (torch's BLAS may then split each product) the native loop still matches
    torch.nn.GRU."""
    reference, fused = _pair(16, 32)
    x = torch.randn(64, 6, 16)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _run(fused, x, use_sequence=True)
    finally:
        torch.set_num_threads(previous)
    expected = _run(reference, x, use_sequence=True)
    for a, b in zip(two, expected):
        assert _relative_error(a, b) < 1e-5


def test_bf16_autocast_stays_close_to_fp32(one_thread):
    """Products in bf16, gates and carried state in fp32: at least as close to the fp32 result
    as torch's own bf16 GRU (measured 0.1-0.4% against torch's 0.3-0.7%)."""
    reference, fused = _pair(64, 64)
    x = torch.randn(300, 20, 64)
    exact = _run(reference, x, use_sequence=True)
    torch_bf16 = _run(reference, x, use_sequence=True, autocast=True)
    fused_bf16 = _run(fused, x, use_sequence=True, autocast=True)
    for name, a, b, c in zip(["output", "h_n", "dx", "w_ih", "w_hh", "b_ih", "b_hh"], fused_bf16, torch_bf16, exact):
        assert _relative_error(a, c) < max(2 * _relative_error(b, c), 1e-2), name


def test_padding_rows_do_not_change_the_real_rows(one_thread):
    """Each sequence is independent: the property the models' padding invariance rests on."""
    _, fused = _pair(6, 8)
    x = torch.randn(5, 4, 6)
    alone = fused(x[:2])[1]
    together = fused(x)[1][:, :2]
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


def test_inference_mode_and_eval_match_training_forward(one_thread):
    _, fused = _pair(6, 8, layers=2, dropout=0.5)
    x = torch.randn(9, 5, 6)
    fused.eval()
    with torch.inference_mode():
        out_inference, h_inference = fused(x)
    out_grad, h_grad = fused(x)
    torch.testing.assert_close(out_inference, out_grad)
    torch.testing.assert_close(h_inference, h_grad)


def test_dropout_between_layers_applies_in_training_only(one_thread):
    _, fused = _pair(6, 8, layers=2, dropout=0.5)
    x = torch.randn(9, 5, 6)
    fused.train()
    torch.manual_seed(0)
    first = fused(x)[1]
    torch.manual_seed(1)
    second = fused(x)[1]
    assert not torch.allclose(first[1], second[1])   # the second layer's input was dropped differently
    torch.testing.assert_close(first[0], second[0])  # the first layer sees no dropout


def test_state_dict_is_torch_grus(one_thread):
    reference, fused = _pair(6, 8, layers=2)
    assert list(fused.state_dict()) == list(reference.state_dict())
    reloaded = torch.nn.GRU(6, 8, num_layers=2, batch_first=True)
    reloaded.load_state_dict(fused.state_dict())


def test_unsupported_calls_and_missing_kernels_fall_back_to_torch(one_thread, monkeypatch):
    reference, fused = _pair(6, 8)
    x = torch.randn(4, 3, 6)
    h0 = torch.randn(1, 4, 8)
    torch.testing.assert_close(fused(x, h0)[1], reference(x, h0)[1])  # an initial state: torch's path
    monkeypatch.setattr(fused_gru, "load_gru_kernels", lambda: None)
    calls = []
    monkeypatch.setattr(fused_gru._GRULayer, "apply", lambda *args: calls.append(args))
    torch.testing.assert_close(fused(x)[1], reference(x)[1])
    assert calls == []


def test_disabling_by_environment(monkeypatch):
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    assert build.load_gru_kernels() is None


@pytest.mark.skipif(not HAS_COMPILER, reason="needs a C++ compiler to build the kernels")
def test_concurrent_builds_leave_one_complete_library(tmp_path, monkeypatch):
    """Ray workers may build at once into a shared cache: each renames a finished file."""
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    results = []
    build_gru = lambda: results.append(build._build_and_load(build.LIBRARIES["gru"]))  # noqa: E731
    threads = [threading.Thread(target=build_gru) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 3 and all(lib is not None for lib in results)
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # no temporary left behind


def test_a_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    monkeypatch.setattr(build, "_cache_key", lambda compiler, source: "broken")
    with pytest.warns(RuntimeWarning, match="using torch.nn.GRU"):
        assert build._build_and_load(build.LIBRARIES["gru"]) is None
    assert list(tmp_path.iterdir()) == []


def test_the_compiler_error_is_in_the_warning(tmp_path, monkeypatch):
    script = tmp_path / "bad-cxx"
    script.write_text("#!/bin/sh\necho 'error: no such intrinsic' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(script))
    with pytest.warns(RuntimeWarning, match="no such intrinsic"):
        assert build._build_and_load(build.LIBRARIES["gru"]) is None
