"""data/feeder.py: a worker's training batches read and padded in a separate actor."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from fvae_dist.data.feeder import EpochStream, feeder_for
from fvae_dist.data.shards import load_manifest
from fvae_dist.data.stream import day_blocks, iter_day_batches, shuffled_each_epoch
from tests.toy_dataset import write_toy_dataset

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def _blocks(toy_dir, split, days_per_block=4):
    return day_blocks(toy_dir, split, days_per_block=days_per_block)


def _n_days(toy_dir, split):
    return load_manifest(toy_dir)["splits"][split]["n_days"]


def _by_date(batches) -> dict:
    """date -> (x, y, instruments) of every real stock, from batches of any D."""
    days = {}
    for batch in batches:
        for d, date in enumerate(batch["date"]):
            n = int(batch["mask"][d].sum())
            days[str(date)] = (batch["x"][d, :n], batch["y"][d, :n], batch["instruments"][d])
    return days


def test_feeder_batches_equal_the_in_process_ones(ray_local, toy_dir):
    ds = _blocks(toy_dir, "valid")
    expected = _by_date(iter_day_batches(ds, 3, drop_last=False))
    with feeder_for(ds) as feeder:
        fed = list(EpochStream(feeder, 3, prefetch_batches=2, drop_last=False))
    assert [b["mask"].shape[0] for b in fed[:-1]] == [3] * (len(fed) - 1)
    assert set(fed[0]) == {"x", "mask", "y", "label", "date", "instruments"}
    got = _by_date(fed)
    assert set(got) == set(expected)
    for date, (x, y, instruments) in expected.items():
        np.testing.assert_array_equal(got[date][0], x)
        np.testing.assert_array_equal(got[date][1], y)
        np.testing.assert_array_equal(got[date][2], instruments)
    # torch.from_numpy needs writable arrays; the object store hands out read-only views
    assert all(b["x"].flags.writeable and b["mask"].flags.writeable for b in fed)


def test_every_epoch_is_a_new_pass_in_a_new_order(ray_local, toy_dir):
    ds = shuffled_each_epoch(_blocks(toy_dir, "train"), seed=5)
    with feeder_for(ds) as feeder:
        orders = [[str(b["date"][0]) for b in EpochStream(feeder, 1, prefetch_batches=4, drop_last=True)]
                  for _ in range(2)]
    assert sorted(orders[0]) == sorted(orders[1]) and len(orders[0]) == _n_days(toy_dir, "train")
    assert orders[0] != orders[1]


def test_an_epoch_closed_early_does_not_block_the_next(ray_local, toy_dir):
    ds = _blocks(toy_dir, "train")
    with feeder_for(ds) as feeder:
        stream = EpochStream(feeder, 1, prefetch_batches=1, drop_last=True)
        next(stream)
        stream.close()  # the feeder's epoch call must finish, or the next one queues behind it
        days = [str(b["date"][0]) for b in EpochStream(feeder, 1, prefetch_batches=1, drop_last=True)]
    assert len(days) == _n_days(toy_dir, "train") == len(set(days))


def test_a_feeder_failing_mid_epoch_raises_in_the_consumer(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    class FailingFeeder:
        """BatchFeeder's epoch interface: one object of one batch, then the reading fails."""

        def epoch(self, batch_days, prefetch_batches, drop_last, per_object, shuffle_seed=None):
            yield [{"x": np.zeros((1, 2, 3, 4), dtype=np.float32), "mask": np.ones((1, 2), dtype=bool)}]
            raise ValueError("shard 7 unreadable")

    stream = EpochStream(FailingFeeder.remote(), 1, prefetch_batches=1, drop_last=True)
    assert next(stream)["x"].shape == (1, 2, 3, 4)
    # the receiver thread hands the failure over instead of leaving the consumer waiting
    with pytest.raises(Exception, match="shard 7 unreadable"):
        next(stream)
    assert next(stream, None) is None


def test_streaming_split_shares_stay_disjoint_with_equally_many_blocks(ray_local, tmp_path):
    """What Ray Train does: one streaming_split iterator per worker, here one feeder each.
    equal=True equalises blocks, not days: 25 training days in shards of 13 and 12 days make
    blocks of 5, 4, 4 and 4, 4, 4 days at G=5, so the two shares of 3 blocks hold 13 and 12
    days, whichever blocks each gets (the training loop then stops both after 12 steps)."""
    toy = write_toy_dataset(tmp_path / "uneven", split_days={"train": 25, "valid": 4, "test": 4})
    ds = shuffled_each_epoch(day_blocks(toy, "train", days_per_block=5), seed=1)
    splits = ds.streaming_split(2, equal=True)
    seen: dict[int, list[list[str]]] = {0: [], 1: []}

    def consume(rank, feeder):
        for _ in range(2):  # all splits must start each epoch together, hence the threads
            seen[rank].append([str(b["date"][0]) for b in EpochStream(feeder, 1, prefetch_batches=2, drop_last=True)])

    with feeder_for(splits[0]) as first, feeder_for(splits[1]) as second:
        threads = [threading.Thread(target=consume, args=(rank, feeder)) for rank, feeder in ((0, first), (1, second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=150)
    for epoch in range(2):
        a, b = seen[0][epoch], seen[1][epoch]
        assert sorted([len(a), len(b)]) == [12, 13]
        assert not set(a) & set(b)
        assert len(set(a) | set(b)) == 25
