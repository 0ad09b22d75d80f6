"""The GPU paths: DDP over NCCL, bf16 / fp16 autocast, DeepSpeed ZeRO-2, predict, and the CPU
fast paths stepping aside on CUDA.

Marked `gpu`: without a CUDA device they are skipped with the reason (tests/conftest.py);
scripts/gpu_check.sh runs them on a GPU machine, with a one-epoch CSI300 throughput figure.
"""
from __future__ import annotations

import io
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

from fvae_dist import accel
from fvae_dist.accel.gru import CPUGRU
from fvae_dist.config import config_from_dict, load_config
from fvae_dist.models.factorvae import FactorVAE, FactorVAEConfig
from fvae_dist.train.engine import DDPEngine, DeepSpeedEngine, deepspeed_safe_globals
from tests.toy_dataset import tiny_overrides

pytestmark = [pytest.mark.gpu]

CUDA = torch.device("cuda", 0)


def _config(**train):
    return config_from_dict({"train": {"lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 0.5, **train}})


def _model():
    torch.manual_seed(0)
    return FactorVAE(FactorVAEConfig(hidden_size=8, num_factors=3, num_portfolios=6)).eval()


def _batch(seed: int = 0, device=CUDA):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 5, 20, generator=generator)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    y = torch.randn(2, 7, generator=generator)
    return x.to(device), mask.to(device), y.to(device)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def nccl_group():
    """A one-process NCCL group, as Ray Train sets one up for each GPU worker (TorchConfig's
    backend): DDP all-reduces through it, DeepSpeed requires it."""
    if dist.is_initialized():
        yield
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_a_ddp_step_over_nccl_equals_a_plain_step(nccl_group):
    """DDPEngine's step with the model under DistributedDataParallel (what Ray Train's
    prepare_model wraps it in for several workers), gradients reduced through NCCL."""
    assert dist.get_backend() == "nccl"
    cfg = _config()
    ddp = DDPEngine(_model(), cfg, CUDA, world_size=1)
    ddp.wrapped = torch.nn.parallel.DistributedDataParallel(ddp.module, device_ids=[CUDA.index])
    plain = DDPEngine(_model(), cfg, CUDA, world_size=1)
    for engine in (ddp, plain):
        engine.module.eval()  # no sampling: both steps see the same arithmetic
        engine.train_step(*_batch(0))
    assert next(ddp.module.parameters()).is_cuda
    for (name, ours), theirs in zip(ddp.module.named_parameters(), plain.module.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_steps_on_cuda(precision, dtype):
    engine = DDPEngine(_model(), _config(precision=precision), CUDA, world_size=1)
    seen = []
    linear = next(m for m in engine.module.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in engine.module.parameters()]
    for seed in range(3):
        out = engine.train_step(*_batch(seed))
        assert torch.isfinite(out["loss"]).item()
    assert dtype in seen  # the forward pass ran in the low precision
    assert engine.scaler.is_enabled() == (precision == "fp16")  # GradScaler for fp16 only
    if precision == "fp16":
        assert 0 < engine.scaler.get_scale() < float("inf")
    after = list(engine.module.parameters())
    assert all(p.dtype == torch.float32 for p in after)  # master weights stay fp32
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_zero2_steps_and_resumes_its_partitions(nccl_group, precision):
    cfg = _config(deepspeed=True, deepspeed_zero_stage=2, precision=precision)
    first = DeepSpeedEngine(_model(), cfg, CUDA)
    first.module.eval()
    before = [p.detach().float().clone() for p in first.module.parameters()]
    out = first.train_step(*_batch(0))
    assert torch.isfinite(out["loss"]).item()
    assert any(not torch.equal(p.detach().float(), b) for p, b in zip(first.module.parameters(), before))
    assert first.sharded_optimizer and first.shared_state() == {}
    # ZeRO-2: each rank saves its own optimizer partition, beside the model's weights; through
    # torch.save and a weights_only load, as a checkpoint carries them (train/loop.py's resume)
    buffer = io.BytesIO()
    torch.save({"model": first.module.state_dict(), "rank": first.rank_state()}, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        saved = torch.load(buffer, weights_only=True)

    second = DeepSpeedEngine(_model(), cfg, CUDA)
    second.module.eval()
    second.module.load_state_dict(saved["model"])
    second.load_state({}, [saved["rank"]])
    # the same weights, master copies and AdamW moments: the next step is the same on both
    loss_a = first.train_step(*_batch(1))["loss"].float()
    loss_b = second.train_step(*_batch(1))["loss"].float()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(first.module.parameters(), second.module.parameters()):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=1e-5, atol=1e-6)


def test_predict_on_cuda_agrees_with_cpu():
    model = _model()
    x, mask, _ = _batch(0, device="cpu")
    with torch.inference_mode():
        mu_cpu, sigma_cpu = model.predict(x, mask)
        mu_gpu, sigma_gpu = model.to(CUDA).predict(x.to(CUDA), mask.to(CUDA))
    assert mu_gpu.is_cuda
    torch.testing.assert_close(mu_gpu.cpu(), mu_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sigma_gpu.cpu(), sigma_cpu, rtol=1e-4, atol=1e-5)


def test_cpu_fast_paths_step_aside_on_cuda(monkeypatch):
    """train.cpu_kernels=auto on a GPU worker: no module is swapped, no allocator environment, and
    a CPUGRU that reaches CUDA anyway (a model swapped on CPU, then moved) runs torch's own GRU."""
    model = accel.prepare_model(_model(), "auto", device_type="cuda")
    assert not any(isinstance(m, CPUGRU) for m in model.modules())
    assert accel.worker_env_vars("auto", device_type="cuda") == {}

    swapped = accel.prepare_model(_model(), "auto", device_type="cpu")
    grus = [m for m in swapped.modules() if isinstance(m, CPUGRU)]
    assert grus
    import fvae_dist.accel.gru as gru_module

    def no_native_loop(*args, **kwargs):
        raise AssertionError("the native CPU loop was asked for on CUDA")

    monkeypatch.setattr(gru_module, "load_gru_loop", no_native_loop)
    gru = grus[0].to(CUDA)
    reference = torch.nn.GRU(gru.input_size, gru.hidden_size, num_layers=gru.num_layers, batch_first=True).to(CUDA)
    reference.load_state_dict(gru.state_dict())
    sequence = torch.randn(6, 5, gru.input_size, device=CUDA)
    torch.testing.assert_close(gru(sequence)[0], reference(sequence)[0])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_ray_train_run_on_the_gpu_trains_predicts_and_keeps_torchs_gru(fvae_ray, toy_dir, tmp_path):
    """fvae-dist train with ray.use_gpu=true: one GPU worker in an NCCL process group, the model on
    CUDA with torch's own GRU (train.cpu_kernels=auto), checkpoints that predict reads on CPU."""
    from fvae_dist.models.registry import build_model
    from fvae_dist.train.predict import predict_split
    from fvae_dist.train.trainer import train

    seen = tmp_path / "gru_seen.txt"

    def recording_builder(model_cfg):
        model = build_model(model_cfg)

        def record(module, args):
            if not seen.exists():  # the worker runs on this machine: a file is the simplest report
                seen.write_text(f"{type(module).__name__} {args[0].device.type}")

        for module in model.modules():
            if isinstance(module, torch.nn.GRU):
                module.register_forward_pre_hook(record)
        return model

    cfg = load_config(None, tiny_overrides(toy_dir, tmp_path / "runs", "gpu", "train.epochs=1", "ray.use_gpu=true",
                                           "ray.num_workers=1", "ray.cpus_per_worker=1", "train.cpu_kernels=auto"))
    outcome = train(cfg, model_builder=recording_builder)
    metrics = json.loads((outcome.run_dir / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 1
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in metrics["history"])
    assert seen.read_text() == "GRU cuda"  # swapped modules would show CPUGRU

    predictions = predict_split(outcome.run_dir, "test")  # the GPU's checkpoint, scored on CPU
    import pandas as pd

    frame = pd.read_parquet(predictions)
    assert len(frame) > 0 and frame["mu"].notna().all()
