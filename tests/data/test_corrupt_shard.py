"""A shard that cannot be read is refused with one line naming it and what is wrong, wherever
shards are read (no Ray here; the commands' own tests are in tests/commands/test_corrupt_shard_cli.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fvae_dist.data.shards import (check_shards_readable, iter_shard_days, load_manifest, read_shard_table,
                                   shard_entries)
from fvae_dist.errors import DataError
from tests.toy_dataset import write_toy_dataset


def truncate(path: Path, keep: float = 0.6) -> None:
    """Cut a file short, as a full disk or an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def corrupt_middle(path: Path) -> None:
    """Overwrite the first data pages with garbage, footer intact: only reading the data fails."""
    data = bytearray(path.read_bytes())
    data[4:2004] = b"\xff" * 2000  # after the leading magic bytes, where the first column chunk starts
    path.write_bytes(bytes(data))


@pytest.fixture()
def toy(tmp_path) -> Path:
    return write_toy_dataset(tmp_path / "dataset")


def first_entry(dataset: Path, split: str = "train") -> dict:
    return shard_entries(load_manifest(dataset), split)[0]


def assert_one_line(error: DataError, path: Path, *words: str) -> None:
    text = str(error)
    assert "\n" not in text, text
    assert text.startswith(f"{path}: "), text
    for word in words:
        assert word in text, text


def test_a_truncated_shard_is_named_when_days_are_cut(toy):
    entry = first_entry(toy)
    truncate(toy / entry["path"])
    with pytest.raises(DataError) as caught:
        next(iter_shard_days(toy, entry, drop_nan_label=True))
    assert_one_line(caught.value, toy / entry["path"], "not a readable Parquet file", "truncated")


def test_garbage_past_an_intact_footer_is_named_when_the_data_is_read(toy):
    entry = first_entry(toy)
    corrupt_middle(toy / entry["path"])
    check_shards_readable(toy, [entry])  # the footer still reads: only the data pages are bad
    with pytest.raises(DataError) as caught:
        next(iter_shard_days(toy, entry, drop_nan_label=True))
    assert_one_line(caught.value, toy / entry["path"], "not a readable Parquet file")


@pytest.mark.parametrize("damage", ["truncated", "missing", "empty", "other shard"])
def test_the_footer_check_names_the_shard(toy, damage):
    entries = shard_entries(load_manifest(toy), "train")
    path = toy / entries[1]["path"]
    if damage == "truncated":
        truncate(path)
        words = ("not a readable Parquet file",)
    elif damage == "missing":
        path.unlink()
        words = ("missing",)
    elif damage == "empty":
        path.write_bytes(b"")
        words = ("not a readable Parquet file",)
    else:  # a shard of another split copied over it: readable, but not what the manifest wrote
        shutil.copy(toy / shard_entries(load_manifest(toy), "valid")[0]["path"], path)
        words = ("rows, the manifest says",)
    check_shards_readable(toy, entries[:1])
    with pytest.raises(DataError) as caught:
        check_shards_readable(toy, entries)
    assert_one_line(caught.value, path, *words)


def test_every_intact_shard_passes_the_footer_check(toy):
    check_shards_readable(toy, load_manifest(toy)["shards"])


def test_the_evaluate_and_robustness_readers_name_the_shard(toy):
    from fvae_dist.commands.evaluate import labels_from_dataset
    from fvae_dist.robustness import scorable_instruments

    entry = first_entry(toy, "test")
    truncate(toy / entry["path"])
    for read in (lambda: labels_from_dataset(toy, "label"), lambda: scorable_instruments(toy, "test"),
                 lambda: read_shard_table(toy / entry["path"])):
        with pytest.raises(DataError) as caught:
            read()
        assert_one_line(caught.value, toy / entry["path"], "not a readable Parquet file")

