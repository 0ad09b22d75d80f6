"""LockstepBatches: every worker takes the same number of steps, however many batches each has
(a DDP step taken by one worker alone would hang the gradient all-reduce)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fvae_dist.train.loop import LockstepBatches


def _worker(rank: int, world: int, init_file: str, counts: list, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = iter([{"k": k} for k in range(counts[rank])])
        taken = []
        for batch in LockstepBatches(batches, world, torch.device("cpu")):
            taken.append(batch["k"])
            # a collective between flags, as DDP's gradient all-reduce is in a real step
            grad = torch.ones(4)
            dist.all_reduce(grad)
        results[rank] = taken
    finally:
        dist.destroy_process_group()

@pytest.mark.timeout(120)
@pytest.mark.parametrize("counts", [[3, 5], [5, 3], [4, 4], [0, 2]])
def test_workers_stop_together_at_the_shortest_share(tmp_path, counts):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), counts, results), nprocs=2, join=True)
        shortest = min(counts)
        assert dict(results) == {0: list(range(shortest)), 1: list(range(shortest))}

def test_one_worker_takes_every_batch_and_times_the_fetches():
    lockstep = LockstepBatches(iter([{"k": 0}, {"k": 1}]), 1, torch.device("cpu"))
    assert [b["k"] for b in lockstep] == [0, 1]
    assert lockstep.wait_seconds >= 0
