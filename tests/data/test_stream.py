"""data/stream.py: the Ray Dataset of day-panel blocks and the per-step batches cut from it
(that the cut days are iter_shard_days' own, bit for bit: test_day_blocks.py)."""
from __future__ import annotations

import numpy as np
import pytest

from fvae_dist.data.shards import iter_shard_days, load_manifest, shard_entries
from fvae_dist.data.stream import day_blocks, iter_day_batches, shuffled_each_epoch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


G = 4  # days per block in these tests: the toy's 12-day training shards become 3 blocks of 4


def _expected_days(toy_dir, split, exclude=None):
    manifest = load_manifest(toy_dir)
    return {
        str(day.date): day
        for entry in shard_entries(manifest, split)
        for day in iter_shard_days(toy_dir, entry, drop_nan_label=True, exclude_instruments=exclude, manifest=manifest)
    }


def _blocks(ds) -> list[list[str]]:
    """The dates of each block, in block order."""
    return [[str(np.datetime64(int(d), "D")) for d in dates]
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy") for dates in batch["dates"]]


def test_blocks_are_runs_of_consecutive_days_in_date_order(ray_local, toy_dir):
    ds = day_blocks(toy_dir, "train", days_per_block=G)
    dates = sorted(_expected_days(toy_dir, "train"))
    blocks = _blocks(ds)
    assert ds.count() == ds.num_blocks() == len(blocks) == 6
    assert blocks == [dates[i : i + G] for i in range(0, len(dates), G)]
    seen = {}
    for batch in iter_day_batches(ds, 1, drop_last=False):
        day = _expected_days(toy_dir, "train")[str(batch["date"][0])]
        n = int(batch["mask"][0].sum())
        np.testing.assert_array_equal(batch["x"][0, :n], day.x)
        np.testing.assert_array_equal(batch["instruments"][0], day.instruments)
        np.testing.assert_array_equal(batch["y"][0, :n], day.y)
        seen[str(batch["date"][0])] = n
    assert list(seen) == dates, "evaluation reads the days in date order"


def test_excluded_instruments_never_appear(ray_local, toy_dir):
    excluded = {"SH600000", "SH600003"}
    ds = day_blocks(toy_dir, "valid", days_per_block=G, exclude_instruments=excluded)
    instruments = set()
    for batch in iter_day_batches(ds, 1, drop_last=False):
        instruments.update(batch["instruments"][0].tolist())
    assert instruments and not instruments & excluded


def test_batches_pad_days_to_the_largest_n(ray_local, toy_dir):
    ds = day_blocks(toy_dir, "train", days_per_block=G)
    n_days = len(_expected_days(toy_dir, "train"))
    batches = list(iter_day_batches(ds, 5, drop_last=True))
    assert len(batches) == n_days // 5
    for batch in batches:
        D, N = batch["mask"].shape
        assert D == 5 and batch["x"].shape[:2] == (D, N) and N == batch["mask"].sum(axis=1).max()
        assert np.all(batch["x"][~batch["mask"]] == 0)
    tail = list(iter_day_batches(ds, 5, drop_last=False))
    assert len(tail) == -(-n_days // 5) and tail[-1]["mask"].shape[0] == n_days % 5


def test_block_order_is_reshuffled_every_pass(ray_local, toy_dir):
    blocks = day_blocks(toy_dir, "train", days_per_block=G)
    ds = shuffled_each_epoch(blocks, seed=3)
    orders = [_blocks(ds) for _ in range(2)]
    assert sorted(orders[0]) == sorted(orders[1]) == _blocks(blocks)
    assert orders[0] != orders[1]


def test_days_inside_each_block_are_shuffled_by_the_epochs_seed(ray_local, toy_dir):
    blocks = day_blocks(toy_dir, "train", days_per_block=G)
    stored = _blocks(blocks)

    def order(seed):
        return [str(b["date"][0]) for b in iter_day_batches(blocks, 1, drop_last=False, shuffle_seed=seed)]

    assert order(None) == [date for group in stored for date in group]
    first, again, other = order(7), order(7), order(8)
    assert first == again and first != other
    for run in (first, other):  # each block's days stay together, in their own order
        cut = [run[i : i + G] for i in range(0, len(run), G)]
        assert [sorted(c) for c in cut] == [sorted(g) for g in stored]
    assert first != order(None)


def test_workers_that_would_starve_ray_data_are_refused(ray_local, toy_dir):
    from fvae_dist.config import load_config
    from fvae_dist.errors import ConfigError
    from fvae_dist.train.trainer import check_cluster_fits

    # the configuration that hangs forever on 2 CPUs: the workers take both, Ray Data gets none
    with pytest.raises(ConfigError, match="cpus_per_worker=0.5"):
        check_cluster_fits(load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=1"]))
    check_cluster_fits(load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=0.5"]))


def test_background_prefetch_yields_the_same_batches(ray_local, toy_dir):
    ds = day_blocks(toy_dir, "valid", days_per_block=G)
    plain = list(iter_day_batches(ds, 3, drop_last=False))
    threaded = list(iter_day_batches(ds, 3, drop_last=False, background=True))
    # Ray does not promise the same block order on every pass: compare contents, not order
    assert [len(b["date"]) for b in threaded] == [len(b["date"]) for b in plain]
    by_date = {str(d): x for b in plain for d, x in zip(b["date"], b["x"])}
    for batch in threaded:
        for date, x in zip(batch["date"], batch["x"]):
            np.testing.assert_array_equal(x[: len(by_date[str(date)])], by_date[str(date)])
    assert sorted(str(d) for b in threaded for d in b["date"]) == sorted(by_date)


class _BrokenIterator:
    def iter_batches(self, **kwargs):
        raise OSError("shard unreadable")
        yield  # pragma: no cover


def test_background_prefetch_reraises_the_readers_error():
    with pytest.raises(OSError, match="shard unreadable"):
        list(iter_day_batches(_BrokenIterator(), 1, background=True))
