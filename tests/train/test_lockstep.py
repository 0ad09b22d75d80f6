"""LockstepBatches: every worker takes the same number of steps, however many batches each has
(a DDP step taken by one worker alone would hang the gradient all-reduce); with the flags sent
through the process group (gloo) and through the shared-memory segment."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fvae_dist.native.build import load_shm_sync
from fvae_dist.train.loop import LockstepBatches
from fvae_dist.train.shm_allreduce import SharedMemoryAllReduce


def _worker(rank: int, world: int, init_file: str, epochs: list, channel: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        flags = None
        if channel == "shared_memory":
            flags = SharedMemoryAllReduce.connect(nn.Linear(2, 1).parameters(), timeout_s=60)
            assert flags is not None, "shared memory unavailable"
        taken = []
        for epoch, counts in enumerate(epochs):  # the flag calls continue across epochs
            batches = iter([{"k": k} for k in range(counts[rank])])
            this_epoch = []
            for batch in LockstepBatches(batches, world, torch.device("cpu"), flags=flags):
                this_epoch.append(batch["k"])
                if rank == epoch % world:  # one rank lags: the others must wait for its flags
                    time.sleep(0.002)
                # a collective between flags, as DDP's gradient all-reduce is in a real step
                grad = torch.ones(4)
                dist.all_reduce(grad)
            taken.append(this_epoch)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(taken))
    finally:
        dist.destroy_process_group()
    if channel == "shared_memory":
        os._exit(0)  # gloo may abort in its destructors at exit (see test_shm_allreduce.py)


CHANNELS = ["process_group",
            pytest.param("shared_memory", marks=pytest.mark.skipif(load_shm_sync() is None,
                                                                   reason="no C++ compiler: native/shm_sync.cpp not built"))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("world, epochs", [
    (2, [[3, 5], [5, 3], [4, 4], [0, 2], [2, 0], [1, 1]]),
    (3, [[4, 2, 3], [3, 3, 3], [5, 6, 0], [2, 2, 1]]),
])
def test_workers_stop_together_at_the_shortest_share(tmp_path, channel, world, epochs):
    # mp.spawn starts fresh interpreters; nothing is forked from this process, which may hold a
    # Ray session (a forked copy of Ray's threads can take the session down on exit)
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), epochs, channel, str(tmp_path)), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    expected = [list(range(min(counts))) for counts in epochs]
    assert results == [expected] * world


def test_one_worker_takes_every_batch_and_times_the_fetches():
    lockstep = LockstepBatches(iter([{"k": 0}, {"k": 1}]), 1, torch.device("cpu"))
    assert [b["k"] for b in lockstep] == [0, 1]
    assert lockstep.wait_seconds >= 0
