"""Ray Data input: the splits as day-panel blocks, streamed to the workers, which cut the windows.

Driver side (`day_blocks`): the shards of one split become a Ray Dataset whose rows are blocks of
at most G (data.days_per_block) consecutive days of one shard, with the day-level features their
windows need (schema: data/day_blocks.py), one block per Ray Data block:

    from_items(shard entries) -> flat_map(read_shard -> shard_blocks) -> materialize

Why blocks and not days: a row per day would carry the day's [N, T, C] windows, T times the
day-level table (on all A-shares more than the object store of a 24 GB machine holds, so Ray
spilled it to disk: docs/datapath.md). A block holds about (G + T - 1) / G times it.

Training: the blocks are materialized once per run and `shuffled_each_epoch` re-orders them on
every pass (block references only, no data moves); the consumer shuffles the days inside every
block (`within_block_seed`). So the days that travel together are G consecutive trading days,
in random order, at a random place of the epoch; G=1 gives a uniform permutation of all days at
T times the memory. Evaluation splits come in date order. Fewer, larger blocks also mean fewer
requests to Ray Data's split coordinator per day (one RPC and one format conversion per block).

Worker side (`iter_day_batches`): the worker's share arrives a block at a time, is cut into days
(`days_in_block`: the same DaySamples as iter_shard_days) and grouped into batches of D days,
padded to the largest N by `collate_days`. Training runs this in the worker's feeder actor
(data/feeder.py), evaluation in the worker itself.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import ray
import ray.train
from ray.data import Dataset, RandomSeedConfig

from fvae_dist.data.day_blocks import days_in_block, shard_blocks
from fvae_dist.data.shards import (DaySample, check_shards_readable, collate_days, load_manifest, read_shard,
                                   shard_entries)
from fvae_dist.errors import DataError, quiet_reported_errors, user_error
from fvae_dist.storage import location


def day_blocks(
    dataset_dir: str | Path,
    split: str,
    *,
    days_per_block: int,
    drop_nan_label: bool = True,
    exclude_instruments: Iterable[str] = (),
    materialize: bool = True,
) -> Dataset:
    """A Ray Dataset of the split's day-panel blocks (data/day_blocks.py), one per Ray Data
    block, in date order.

    materialize=True reads the shards once (Ray tasks) and keeps the blocks in the object store,
    which is what makes the per-epoch shuffle free; False leaves a lazy dataset that re-reads the
    shards on every pass (fine for a split read once, such as test)."""
    if days_per_block < 1:
        raise ValueError(f"days_per_block must be >= 1, got {days_per_block}")
    dataset_dir = str(location(dataset_dir))  # a directory or a storage URI, as the read tasks get it
    manifest = load_manifest(dataset_dir)
    entries = shard_entries(manifest, split)
    if not entries:
        raise DataError(f"{dataset_dir}/manifest.json: split {split!r} has no shards")
    check_shards_readable(dataset_dir, entries)
    ds = ray.data.from_items([{"shard": index} for index in range(len(entries))], override_num_blocks=len(entries))
    # A Ray Data block is closed as soon as it exceeds this size, so each day-panel block ends up
    # in one of its own: Ray Data's block order is then date order, and streaming_split hands
    # out whole day-panel blocks.
    ds.context.target_max_block_size = 1
    # Blocks in shard order, whichever read task finishes first: the per-epoch shuffle permutes
    # this order, so without it a seed would not fix the day order (see DaySplitConfig).
    ds.context.execution_options.preserve_order = True
    ds = ds.flat_map(
        _shard_blocks,
        fn_kwargs={
            "dataset_dir": dataset_dir,
            "entries": entries,
            "features": list(manifest["features"]),
            "seq_len": int(manifest["seq_len"]),
            "days_per_block": int(days_per_block),
            "drop_nan_label": drop_nan_label,
            "exclude": sorted(set(exclude_instruments)),
        },
    )
    if not materialize:
        return ds
    try:
        with quiet_reported_errors():
            return ds.materialize()
    except Exception as exc:
        # a shard that fails inside a read task (corrupt past its footer) arrives wrapped in
        # Ray's task error: raise the DataError naming it, which the CLI prints as one line
        mine = user_error(exc)
        if mine is None:
            raise
        raise mine from None


def _shard_blocks(item: dict, *, dataset_dir, entries, features, seq_len, days_per_block, drop_nan_label,
                  exclude) -> Iterator[dict]:
    shard = read_shard(dataset_dir, entries[int(item["shard"])], features, set(exclude) or None)
    yield from shard_blocks(shard, seq_len=seq_len, days_per_block=days_per_block, drop_nan_label=drop_nan_label)


def shuffled_each_epoch(ds: Dataset, seed: int) -> Dataset:
    """Reshuffle block order on every pass: Ray reseeds from (seed, execution index)."""
    return ds.randomize_block_order(seed=RandomSeedConfig(seed=int(seed), reseed_after_execution=True))


def epoch_seed(seed: int, start_epoch: int) -> int:
    """Base seed for a (possibly resumed) run: a resumed run starting at epoch e does not replay
    the day orders of epochs 0, 1, ... that the first attempt already trained on."""
    return int(np.random.SeedSequence([int(seed), int(start_epoch)]).generate_state(1)[0])


def within_block_seed(seed: int, epoch: int) -> int:
    """Seed of epoch `epoch`'s order of the days inside each block (iter_day_batches)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), 1]).generate_state(1)[0])


class DaySplitConfig(ray.train.DataConfig):
    """How Ray Train hands the datasets to its workers.

    Training blocks go through streaming_split(equal=True): disjoint blocks and the same number
    of them on every worker (up to world size - 1 leftover blocks are dropped). That equalises
    blocks, not days: a block holds G or a few fewer days (data/day_blocks.py), so the workers'
    day counts can differ by a few days, and the training loop stops every worker when the first
    runs out (train/loop.py, LockstepBatches), which keeps DDP's collectives in step. Evaluation
    splits go through streaming_split(equal=False): still disjoint, but
    every day is scored once, none dropped; evaluation needs no per-step collective."""

    def __init__(self, equal_split: Iterable[str] = ("train",)):
        super().__init__(datasets_to_split="all")
        self._equal_split = frozenset(equal_split)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            options = self.default_ingest_options()
            # Hand out blocks in the shuffled order rather than as they become ready: with one
            # worker, train.seed then fixes every epoch's day order (a rerun repeats the run
            # exactly). With several, which worker gets which day still depends on which asks
            # first.
            options.preserve_order = True
            ds.context.execution_options = options
            splits = ds.streaming_split(world_size, equal=name in self._equal_split, locality_hints=worker_node_ids)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


def iter_day_batches(
    iterator, batch_days: int, *, prefetch_batches: int = 4, drop_last: bool = True, background: bool = False,
    shuffle_seed: int | None = None,
) -> Iterator[dict]:
    """Batches of D days from a Ray DataIterator (a worker's shard) or a Dataset.

    Yields collate_days' dict (x [D, N, T, C], y, label, mask [D, N]) plus "date"
    (datetime64[D], [D]) and "instruments" (list of D arrays). A last group shorter than D is
    dropped when drop_last (training keeps step counts equal); kept for evaluation.
    shuffle_seed: shuffle the days inside each block (see the module docstring); None keeps
    their (date) order.
    background=True fetches and pads the next `prefetch_batches` batches in a thread while the
    caller computes (numpy copies and torch kernels release the GIL, so the two overlap)."""
    batches = batches_of_days(iterator, batch_days, prefetch_batches, drop_last, shuffle_seed)
    if background and prefetch_batches > 0:
        return InBackground(batches, depth=prefetch_batches)
    return batches


def batches_of_days(iterator, batch_days: int, prefetch_batches: int, drop_last: bool,
                    shuffle_seed: int | None = None) -> Iterator[dict]:
    """iter_day_batches' batches, fetched and padded in the calling thread."""
    group: list[DaySample] = []
    for day in days_of(iterator, prefetch_batches, shuffle_seed):
        group.append(day)
        if len(group) == batch_days:
            yield collate_with_dates(group)
            group = []
    if group and not drop_last:
        yield collate_with_dates(group)


def days_of(iterator, prefetch_blocks: int, shuffle_seed: int | None = None) -> Iterator[DaySample]:
    """The days of a Ray DataIterator or Dataset of day-panel blocks, one block at a time
    (batch_size=None: Ray Data hands over its blocks as they are), windows cut here.
    shuffle_seed: each block's days in an order drawn from (shuffle_seed, the block's first
    date), so it does not matter which worker gets the block."""
    for batch in iterator.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_blocks):
        for row in range(len(batch["dates"])):
            days = days_in_block({name: column[row] for name, column in batch.items()})
            if shuffle_seed is not None and len(days) > 1:
                rng = np.random.default_rng([int(shuffle_seed), int(batch["dates"][row][0])])
                days = [days[i] for i in rng.permutation(len(days))]
            yield from days


class InBackground:
    """`items` run in a daemon thread from construction on, up to `depth` results ahead; errors
    re-raise in the consumer. close() stops the thread and waits for it (at most join_timeout
    seconds; None: until it has stopped). The thread holds no reference to this object, so one
    dropped without close() is collected, and its thread stopped, like a closed generator."""

    def __init__(self, items: Iterator, depth: int, *, name: str = "day-batches"):
        self._slots: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=_produce, args=(items, self._slots, self._stop), name=name,
                                        daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        item = self._slots.get()
        if item is _DONE or isinstance(item, _Failed):
            self._finished = True
            if item is _DONE:
                raise StopIteration
            raise item.error
        return item

    def close(self, join_timeout: float | None = 5.0) -> None:
        self._finished = True
        self._stop.set()
        self._thread.join(timeout=join_timeout)

    def __del__(self) -> None:
        self._stop.set()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def _produce(items: Iterator, slots: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            if not _put(slots, stop, item):
                return
        _put(slots, stop, _DONE)
    except BaseException as error:  # handed to the consumer, which re-raises it
        _put(slots, stop, _Failed(error))


def _put(slots: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            slots.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def collate_with_dates(days: list[DaySample]) -> dict:
    batch = collate_days(days)
    batch["date"] = np.array([day.date for day in days], dtype="datetime64[D]")
    batch["instruments"] = [day.instruments for day in days]
    return batch
