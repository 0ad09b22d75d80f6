"""The training days reach the workers through streaming_split(equal=True) (data/stream.py,
DaySplitConfig): every worker gets the same number of days in every epoch, so with the loop's
batching (days cut out of blocks of data.days_per_block, batches of data.batch_days, the short
last one dropped) every worker takes the same number of DDP steps. This pins that guarantee of
Ray Data, on which the training loop relies instead of checking it step by step."""
from __future__ import annotations

import pytest
import ray

from fvae_dist.data.stream import DaySplitConfig, batches_of_days, day_dataset, grouped_days, shuffled_each_epoch
from tests.train.toy_dataset import write_toy_dataset

TRAIN_DAYS = 29  # divisible by none of the world sizes and block sizes below


@ray.remote(num_cpus=0)
class Consumer:
    """One worker's side: its split, iterated epoch by epoch as the loop does."""

    def __init__(self, split):
        self.split = split

    def epoch(self, batch_days: int, seed: int) -> dict:
        days = [str(b["date"][i]) for b in self._batches(batch_days, seed) for i in range(len(b["date"]))]
        return {"days": days, "steps": len(days) // batch_days}

    def _batches(self, batch_days, seed):
        return batches_of_days(self.split, batch_days, prefetch_batches=1, drop_last=True, shuffle_seed=seed)


@pytest.fixture(scope="module")
def train_days(tmp_path_factory, ray_local):
    directory = write_toy_dataset(tmp_path_factory.mktemp("split") / "data",
                                  split_days={"train": TRAIN_DAYS, "valid": 4, "test": 4},
                                  shards_per_split={"train": 3, "valid": 1, "test": 1})
    return day_dataset(directory, "train")


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world, days_per_block, batch_days", [(2, 8, 1), (3, 8, 2), (2, 5, 3)])
def test_every_worker_gets_the_same_days_count_and_steps(train_days, world, days_per_block, batch_days):
    blocks = shuffled_each_epoch(grouped_days(train_days, days_per_block, seed=0), seed=1)
    splits = DaySplitConfig().configure({"train": blocks}, world_size=world, worker_handles=None,
                                        worker_node_ids=None)
    consumers = [Consumer.remote(splits[rank]["train"]) for rank in range(world)]
    for epoch in range(3):
        shares = ray.get([consumer.epoch.remote(batch_days, epoch) for consumer in consumers])
        per_worker = TRAIN_DAYS // world
        assert [share["steps"] for share in shares] == [per_worker // batch_days] * world, shares
        days = [day for share in shares for day in share["days"]]
        assert len(days) == len(set(days)) == world * (per_worker // batch_days) * batch_days  # disjoint
