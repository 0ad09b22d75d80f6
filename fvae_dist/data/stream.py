"""Ray Data input: one dataset row per trading day, streamed to the training workers.

Driver side (`day_dataset`): the shards of one split become a Ray Dataset whose rows are days

    from_items(shard entries) -> flat_map(iter_shard_days) -> materialize (one day per block)

For training, `grouped_days` then puts the days into blocks of G (data.days_per_block) drawn at
random, once per run, and `shuffled_each_epoch` puts a block-order shuffle on top: each epoch
re-orders block references and moves no data, and the consumer shuffles the days inside every
block (`batches_of_days(shuffle_seed=...)`). Why blocks of several days: a worker pulls its share
from Ray Data's split coordinator one block at a time, one RPC and one format conversion per
block, which cost about 2.5 ms of CPU per day with one day per block against 0.7-1 ms with 8-16
(two consumers on 2 cores, data/feeder.py) -- with 2 workers on 2 cores that was a tenth of the
machine. The price: the same G days always travel together (in random order, in a random place
of the epoch); G=1 restores a uniform permutation of the days every epoch. Ray Train hands the
training dataset to the workers through `streaming_split(equal=True)`, so in every epoch each
worker gets its own disjoint days and all workers get the same number of them.

Worker side (`iter_day_batches`): the worker's share arrives a block at a time, is cut into days
and grouped into batches of D days, padded to the largest N by `collate_days` (Ray Data is never
asked to concatenate tensors of different N). Training runs this in the worker's feeder actor
(data/feeder.py), evaluation in the worker itself.

Rows: date (int64 days since 1970-01-01), instruments (list of str), x [N, T, C] float32,
y [N] float32 (CSRankNorm target), label [N] float32 (raw LABEL0).
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import ray
import ray.train
from ray.data import DataContext, Dataset, RandomSeedConfig

from fvae_dist.data.shards import DaySample, collate_days, iter_shard_days, load_manifest, shard_entries
from fvae_dist.errors import DataError

_UNIX_DAY = np.datetime64("1970-01-01", "D")


def day_dataset(
    dataset_dir: str | Path,
    split: str,
    *,
    drop_nan_label: bool = True,
    exclude_instruments: Iterable[str] = (),
    materialize: bool = True,
) -> Dataset:
    """A Ray Dataset of the split's days, one day per block.

    materialize=True reads and cuts the shards once (Ray tasks) and keeps the days in the object
    store, which is what makes the per-epoch shuffle free; False leaves a lazy dataset that
    re-reads the shards on every pass (fine for a split read once, such as test)."""
    dataset_dir = str(Path(dataset_dir).resolve())
    manifest = load_manifest(dataset_dir)
    entries = shard_entries(manifest, split)
    if not entries:
        raise DataError(f"{dataset_dir}/manifest.json: split {split!r} has no shards")
    _quiet_ray_data()
    ds = ray.data.from_items([{"shard": index} for index in range(len(entries))], override_num_blocks=len(entries))
    # A block is closed as soon as it exceeds this size, so each day (hundreds of KB) ends up
    # in a block of its own: block order then is day order.
    ds.context.target_max_block_size = 1
    # Blocks in shard order, whichever read task finishes first: the per-epoch shuffle permutes
    # this order, so without it a seed would not fix the day order (see DaySplitConfig).
    ds.context.execution_options.preserve_order = True
    ds = ds.flat_map(
        _shard_rows,
        fn_kwargs={
            "dataset_dir": dataset_dir,
            "entries": entries,
            "manifest": manifest,
            "drop_nan_label": drop_nan_label,
            "exclude": sorted(set(exclude_instruments)),
        },
    )
    return ds.materialize() if materialize else ds


_NO_BLOCK_LIMIT = 1 << 40  # bytes: larger than any block of days


def grouped_days(ds: Dataset, days_per_block: int, seed: int) -> Dataset:
    """`ds` (one day per block, as day_dataset makes it) re-cut into blocks of `days_per_block`
    days drawn at random (seeded), materialized. 1 returns `ds` itself. The days are copied once
    (a Ray Data pass); the one-day blocks are freed when the caller drops `ds`."""
    if days_per_block < 1:
        raise ValueError(f"days_per_block must be >= 1, got {days_per_block}")
    if days_per_block == 1:
        return ds
    grouped = ds.randomize_block_order(seed=int(seed)).map_batches(
        _same_table, batch_size=days_per_block, batch_format="pyarrow", zero_copy_batch=True)
    # each batch of G days leaves the map as ONE block (day_dataset's limit would cut it up)
    grouped.context.target_max_block_size = _NO_BLOCK_LIMIT
    # the groups in the shuffled order whichever task finishes first, so a seed fixes them
    grouped.context.execution_options.preserve_order = True
    return grouped.materialize()


def _same_table(table):
    return table


def shuffled_each_epoch(ds: Dataset, seed: int) -> Dataset:
    """Reshuffle day order on every pass: Ray reseeds from (seed, execution index)."""
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

    Training days go through streaming_split(equal=True): disjoint days and the same number of
    them on every worker (a few leftover days are dropped), which keeps DDP's collectives in
    step. Evaluation splits go through streaming_split(equal=False): still disjoint, but every
    day is scored once, none dropped; evaluation needs no per-step collective."""

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
    shuffle_seed: shuffle the days inside each block (see grouped_days); None keeps their order.
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
    """The days of a Ray DataIterator or Dataset, one block at a time (batch_size=None: Ray Data
    hands over its blocks as they are). shuffle_seed: each block's days in an order drawn from
    (shuffle_seed, the block's first date), so it does not matter which worker gets the block."""
    for block in iterator.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_blocks):
        days = [row_to_day(block, row) for row in range(len(block["date"]))]
        if shuffle_seed is not None and len(days) > 1:
            rng = np.random.default_rng([int(shuffle_seed), int(block["date"][0])])
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


def row_to_day(block: dict, row: int = 0) -> DaySample:
    """Row `row` of a numpy batch from Ray Data -> DaySample."""
    return DaySample(
        date=_UNIX_DAY + np.timedelta64(int(block["date"][row]), "D"),
        instruments=np.asarray(block["instruments"][row], dtype=str),
        x=np.asarray(block["x"][row], dtype=np.float32),
        y=np.asarray(block["y"][row], dtype=np.float32),
        label=np.asarray(block["label"][row], dtype=np.float32),
    )


def collate_with_dates(days: list[DaySample]) -> dict:
    batch = collate_days(days)
    batch["date"] = np.array([day.date for day in days], dtype="datetime64[D]")
    batch["instruments"] = [day.instruments for day in days]
    return batch


def _shard_rows(item: dict, *, dataset_dir, entries, manifest, drop_nan_label, exclude) -> Iterator[dict]:
    entry = entries[int(item["shard"])]
    for day in iter_shard_days(
        dataset_dir, entry, drop_nan_label=drop_nan_label, exclude_instruments=set(exclude) or None, manifest=manifest
    ):
        yield {
            "date": np.int64((day.date - _UNIX_DAY).astype(np.int64)),
            "instruments": day.instruments.tolist(),
            "x": day.x,
            "y": day.y,
            "label": day.label,
        }


def _quiet_ray_data() -> None:
    # Progress bars from several workers interleave into noise in logs and test output.
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
