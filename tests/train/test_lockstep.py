"""LockstepBatches: every worker takes the same number of steps, however many batches each has
(a DDP step taken by one worker alone would hang the gradient all-reduce)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fvae_dist.train.loop import LockstepBatches


def _worker(rank: int, world: int, init_file: str, counts: list, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = iter([{"k": k} for k in range(counts[rank])])
        taken = []
        for batch in LockstepBatches(batches, world, torch.device("cpu")):
            taken.append(batch["k"])
            # a collective between flags, as DDP's gradient all-reduce is in a real step
            grad = torch.ones(4)
            dist.all_reduce(grad)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(taken))
    finally:
        dist.destroy_process_group()

@pytest.mark.timeout(120)
@pytest.mark.parametrize("counts", [[3, 5], [5, 3], [4, 4], [0, 2]])
def test_workers_stop_together_at_the_shortest_share(tmp_path, counts):
    # mp.spawn starts fresh interpreters; nothing is forked from this process, which may hold a
    # Ray session (a forked copy of Ray's threads can take the session down on exit)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), counts, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    shortest = min(counts)
    assert results == [list(range(shortest)), list(range(shortest))]

def test_one_worker_takes_every_batch_and_times_the_fetches():
    lockstep = LockstepBatches(iter([{"k": 0}, {"k": 1}]), 1, torch.device("cpu"))
    assert [b["k"] for b in lockstep] == [0, 1]
    assert lockstep.wait_seconds >= 0
