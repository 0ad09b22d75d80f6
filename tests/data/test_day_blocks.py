"""data/day_blocks.py: day-panel blocks give exactly iter_shard_days' day samples, bit for bit,
cut in the consumer, through Ray Data or without it."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from fvae_dist.data.day_blocks import days_in_block, shard_blocks
from fvae_dist.data.shards import iter_shard_days, load_manifest, read_shard, shard_entries
from fvae_dist.data.stream import day_blocks, days_of, iter_day_batches
from fvae_dist.errors import DataError
from tests.toy_dataset import add_edge_cases, write_toy_dataset

SPLITS = ("train", "valid", "test")
HELD_OUT = frozenset({"SH600001", "SH600005"})  # SH600005 is also the late-listed stock
READS = [pytest.param(drop, exclude, id=f"drop_nan_label={drop}-exclude={bool(exclude)}")
         for drop in (True, False) for exclude in (frozenset(), HELD_OUT)]


@pytest.fixture(scope="module")
def edge_dir(tmp_path_factory):
    """The toy data set with a split start without history, a late listing and days without
    samples (toy_dataset.add_edge_cases)."""
    return add_edge_cases(write_toy_dataset(tmp_path_factory.mktemp("edges") / "dataset", seed=3))


def _reference(dataset_dir, split, drop, exclude):
    manifest = load_manifest(dataset_dir)
    return [day for entry in shard_entries(manifest, split)
            for day in iter_shard_days(dataset_dir, entry, drop_nan_label=drop, exclude_instruments=exclude or None,
                                       manifest=manifest)]


def _blocks(dataset_dir, split, drop, exclude, days_per_block):
    manifest = load_manifest(dataset_dir)
    for entry in shard_entries(manifest, split):
        shard = read_shard(dataset_dir, entry, manifest["features"], exclude or None)
        yield from shard_blocks(shard, seq_len=manifest["seq_len"], days_per_block=days_per_block,
                                drop_nan_label=drop)


def _assert_identical(got, expected):
    assert [str(day.date) for day in got] == [str(day.date) for day in expected]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a.instruments, b.instruments)
        for name in ("x", "y", "label"):
            left, right = getattr(a, name), getattr(b, name)
            assert left.dtype == right.dtype == np.float32 and left.shape == right.shape, (a.date, name)
            assert left.tobytes() == right.tobytes(), (a.date, name)  # bit for bit, NaNs included


def test_the_edge_cases_are_there(edge_dir):
    """What add_edge_cases promises, so the tests below exercise it."""
    manifest = load_manifest(edge_dir)
    first, second = shard_entries(manifest, "train")[:2]
    assert first["halo_start"] == first["own_start"]
    kept = _reference(edge_dir, "train", True, frozenset())
    every = _reference(edge_dir, "train", False, frozenset())
    own_days = sorted({str(day.date) for day in every} | {str(day.date) for day in kept})
    assert len(every) == len(kept) + 1, "one day has no label: a sample only without DropnaLabel"
    assert np.datetime64(second["own_end"]) >= np.datetime64(own_days[-1])
    assert np.all(kept[0].x[:, 0] == 0), "the split's first window is left-padded"
    late = next(i for i, name in enumerate(kept[6].instruments) if name == "SH600005")
    assert np.all(kept[6].x[late, :-1] == 0) and np.any(kept[6].x[late, -1] != 0)


@pytest.mark.parametrize("days_per_block", [1, 3, 8])
@pytest.mark.parametrize("drop, exclude", READS)
def test_blocks_cut_into_the_same_days_as_iter_shard_days(edge_dir, drop, exclude, days_per_block):
    for split in SPLITS:
        got = [day for block in _blocks(edge_dir, split, drop, exclude, days_per_block) for day in days_in_block(block)]
        _assert_identical(got, _reference(edge_dir, split, drop, exclude))
        if exclude:
            assert not {name for day in got for name in day.instruments} & exclude


def test_a_shards_days_are_cut_into_even_runs_of_consecutive_days(edge_dir):
    manifest = load_manifest(edge_dir)
    seq_len = manifest["seq_len"]
    for entry in shard_entries(manifest, "train"):
        days = [str(d.date) for d in iter_shard_days(edge_dir, entry, drop_nan_label=True, manifest=manifest)]
        shard = read_shard(edge_dir, entry, manifest["features"])
        blocks = list(shard_blocks(shard, seq_len=seq_len, days_per_block=5, drop_nan_label=True))
        sizes = [len(block["dates"]) for block in blocks]
        assert len(blocks) == math.ceil(len(days) / 5) and max(sizes) <= 5 and max(sizes) - min(sizes) <= 1
        cut = [str(np.datetime64(int(d), "D")) for block in blocks for d in block["dates"]]
        assert cut == days, "the blocks are the shard's days in date order, each once"
        for block in blocks:
            n_stocks, n_panel_days, n_features = block["panel"].shape
            assert n_features == len(manifest["features"]) and n_stocks == len(block["instruments"])
            # the panel ends at the block's last day: no later day is even there to be read
            assert n_panel_days == block["window_start"][-1] + seq_len
            assert block["window_start"][0] == 0 and np.all(np.diff(block["window_start"]) >= 1)
            # every stock in the block is a sample on at least one of its days
            assert np.all(block["sample"].any(axis=0))


def test_days_without_a_sample_leave_a_gap_in_the_windows_starts(edge_dir):
    """The second training shard's 4th and 5th days have no sample (add_edge_cases): the day
    after them starts its window 3 panel days after the day before them; without DropnaLabel
    only the 5th has none."""
    manifest = load_manifest(edge_dir)
    entry = shard_entries(manifest, "train")[1]
    shard = read_shard(edge_dir, entry, manifest["features"])
    (block,) = shard_blocks(shard, seq_len=manifest["seq_len"], days_per_block=100, drop_nan_label=True)
    assert list(np.diff(block["window_start"])) == [1, 1, 3] + [1] * (len(block["dates"]) - 4)
    (block,) = shard_blocks(shard, seq_len=manifest["seq_len"], days_per_block=100, drop_nan_label=False)
    assert list(np.diff(block["window_start"])) == [1, 1, 1, 2] + [1] * (len(block["dates"]) - 5)


def test_a_shard_without_a_feature_column_is_named_with_the_column(tmp_path):
    dataset = write_toy_dataset(tmp_path / "ds")
    entry = shard_entries(load_manifest(dataset), "valid")[0]
    path = dataset / entry["path"]
    pq.write_table(pq.read_table(path).drop(["F2"]), path)
    with pytest.raises(DataError, match=rf"{entry['path']}: no column 'F2'"):
        read_shard(dataset, entry, ["F0", "F1", "F2", "F3"])


def test_a_shard_out_of_order_is_refused(tmp_path):
    dataset = write_toy_dataset(tmp_path / "ds")
    entry = shard_entries(load_manifest(dataset), "valid")[0]
    path = dataset / entry["path"]
    table = pq.read_table(path)
    pq.write_table(table.take(np.r_[1, 0, 2 : table.num_rows]), path)
    with pytest.raises(DataError, match="not sorted by \\(date, instrument\\)"):
        read_shard(dataset, entry, ["F0", "F1", "F2", "F3"])


@pytest.mark.ray
@pytest.mark.timeout(240)
@pytest.mark.parametrize("drop, exclude", READS)
def test_ray_datasets_of_blocks_give_the_same_days(ray_local, edge_dir, drop, exclude):
    """Through Ray Data (Arrow tensors in the object store) and the consumer's cutting: every day
    of every split, in date order, bit for bit; the batches as collate_days pads them."""
    for split in SPLITS:
        ds = day_blocks(edge_dir, split, days_per_block=3, drop_nan_label=drop, exclude_instruments=exclude)
        expected = _reference(edge_dir, split, drop, exclude)
        assert ds.count() == ds.num_blocks(), "one day-panel block per Ray Data block"
        _assert_identical(list(days_of(ds, 2)), expected)
        batches = list(iter_day_batches(ds, 2, drop_last=False))
        assert [str(d) for b in batches for d in b["date"]] == [str(d.date) for d in expected]
        for d, day in enumerate(expected):
            batch, k = batches[d // 2], d % 2
            n = len(day.instruments)
            assert batch["x"][k, :n].tobytes() == day.x.tobytes() and batch["mask"][k].sum() == n
