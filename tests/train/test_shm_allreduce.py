"""train/shm_allreduce.py: DDP's gradient average through shared memory, in real processes."""
from __future__ import annotations

import json
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fvae_dist.native.build import load_shm_sync
from fvae_dist.train import shm_allreduce
from fvae_dist.train.shm_allreduce import SharedMemoryAllReduce, _attach, _create_segment, _Layout

pytestmark = pytest.mark.skipif(load_shm_sync() is None, reason="no C++ compiler: native/shm_sync.cpp not built")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process
    return nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 1))


def _worker(rank: int, world: int, port: int, out_path: str, shm_dir: str | None) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if shm_dir is not None:
        shm_allreduce.SHM_DIR = shm_allreduce.Path(shm_dir)
    # Tiny buckets: several hook calls per step, so the two halves of the segment alternate
    # within a step as well as across steps.
    reference = nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=0.004)
    shared = nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=0.004)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hook = SharedMemoryAllReduce.connect(shared.module.parameters(), timeout_s=60)
    result = {"connected": hook is not None, "warnings": [str(w.message) for w in caught]}
    if hook is not None:
        shared.register_comm_hook(None, hook.hook)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        max_error, identical = 0.0, True
        for _ in range(4):
            x = torch.randn(16 + rank, 6, generator=generator)
            y = torch.randn(16 + rank, 1, generator=generator)
            for ddp in (reference, shared):
                ddp.zero_grad()
                ((ddp(x) - y) ** 2).mean().backward()
            for a, b in zip(reference.module.parameters(), shared.module.parameters()):
                max_error = max(max_error, ((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-12)).item())
                gathered = [torch.empty_like(b.grad) for _ in range(world)]
                dist.all_gather(gathered, b.grad)
                identical &= all(torch.equal(g, gathered[0]) for g in gathered)
            for ddp in (reference, shared):
                with torch.no_grad():
                    for p in ddp.module.parameters():
                        p -= 0.1 * p.grad
        result.update(max_relative_error=max_error, identical_on_every_rank=identical, calls=hook._calls)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13's gloo sometimes aborts in its static destructors at interpreter exit
    # ("terminate called without an active exception"), with or without this hook; the
    # results are written, so leave without running them.
    os._exit(0)


def _run(world: int, tmp_path, shm_dir: str | None = None) -> dict:
    out = tmp_path / "result.json"
    mp.start_processes(_worker, args=(world, _free_port(), str(out), shm_dir), nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_gradients_equal_the_process_group_average_and_are_identical_on_every_rank(world, tmp_path):
    result = _run(world, tmp_path)
    assert result["connected"], result["warnings"]
    # after DDP's first step (one bucket) two buckets a step: the two halves of the segment
    # alternate within steps as well as across them
    assert result["calls"] == 7
    # the same average as gloo's all-reduce, up to the order of the float additions
    assert result["max_relative_error"] < 1e-5
    # every rank adds the same slots in the same order: replicas cannot drift apart
    assert result["identical_on_every_rank"]


@pytest.mark.timeout(120)
def test_without_shared_memory_every_rank_falls_back_and_rank_0_says_why(tmp_path):
    result = _run(2, tmp_path, shm_dir=str(tmp_path / "no-such-dir"))
    assert not result["connected"]
    assert any("process group" in w and "no-such-dir" in w for w in result["warnings"]), result["warnings"]


class _Bucket:
    def __init__(self, tensor):
        self._tensor = tensor

    def buffer(self):
        return self._tensor


def _lonely_rank_0(timeout_s: float) -> SharedMemoryAllReduce:
    layout = _Layout(world=2, slot_numel=10, dtype=torch.float32)
    offer, problem = _create_segment(layout)
    assert problem is None
    mapping, problem = _attach(*offer, layout)
    shm_allreduce.os.unlink(offer[0])
    assert problem is None
    return SharedMemoryAllReduce(mapping, layout, rank=0, lib=load_shm_sync(), timeout_s=timeout_s)


def test_a_rank_that_never_arrives_fails_the_step_with_a_clear_error():
    hook = _lonely_rank_0(timeout_s=0.2)
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 0 waited 0 s for the other 1 rank.*gradient bucket call 1"):
        hook.hook(None, _Bucket(torch.ones(10)))
    assert 0.2 <= time.perf_counter() - started < 5


def test_a_rank_that_never_sends_its_step_flag_fails_with_a_clear_error():
    flags = _lonely_rank_0(timeout_s=0.2)
    call = flags.send_flag(True)
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 0 waited 0 s for the other 1 rank.*lockstep flag call 1"):
        flags.all_have(call)
    assert 0.2 <= time.perf_counter() - started < 5


def test_a_segment_from_another_machine_is_refused(tmp_path):
    layout = _Layout(world=2, slot_numel=4, dtype=torch.float32)
    offer, _ = _create_segment(layout)
    try:
        mapping, problem = _attach(offer[0], b"x" * len(offer[1]), layout)
        assert mapping is None and "not rank 0's segment" in problem
        mapping, problem = _attach(str(tmp_path / "missing"), offer[1], layout)
        assert mapping is None and "cannot map" in problem
    finally:
        shm_allreduce.os.unlink(offer[0])


def test_a_full_tmpfs_is_refused_up_front_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(shm_allreduce, "SHM_DIR", tmp_path)

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_allreduce.os, "posix_fallocate", no_space)
    offer, problem = _create_segment(_Layout(world=2, slot_numel=1000, dtype=torch.float32))
    assert offer is None and "No space left" in problem and str(tmp_path) in problem
    assert list(tmp_path.iterdir()) == []
