"""Read a training worker's day-panel blocks, cut their windows and pad the batches in a separate
process: the worker's "feeder" actor.

    with feeder_for(shard) as feeder:                  once per worker, on the worker's node
        for batch in EpochStream(feeder, D, ...): ...  one epoch; same batches as iter_day_batches

Why a separate process: pulling data out of Ray Data is Python (an RPC to the split coordinator,
Arrow deserialisation, format conversion, cutting windows) in threads of the process that
consumes it. Inside the training worker those threads take the GIL from the training step, whose
Python runs between every tensor op, so the step itself slows while its own CPU time does not
change. The feeder does that work in its own process (on the CPU share Ray Data has anyway) and
sends finished, padded batches through the node's shared-memory object store: the worker's cost
per step is one zero-copy `ray.get`. It is ours, not Ray's, and earns its place by the step time
it gives back (docs/benchmarks.md); `data.feeder=false` reads in the worker's threads instead.

Semantics are those of `iter_day_batches` on the same shard: the feeder iterates the shard (the
streaming_split DataIterator Ray Train gave this worker), so every epoch is a new Ray Data pass
with its own block order, and disjoint shares of equally many blocks across workers are
unchanged. Cutting each day's [N, T, C] windows from its block (data/day_blocks.py) is done
here too, off the training process.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fvae_dist.data.stream import InBackground, batches_of_days


BATCHES_PER_OBJECT = 4


@ray.remote(num_cpus=0)
class BatchFeeder:
    """Holds one worker's DataIterator; each `epoch` call streams one pass as padded batches.

    num_cpus=0: it runs on the CPU share the trainer leaves to Ray Data (ScalingConfig's
    fractional resources_per_worker), doing the work Ray Data's iterator threads did in the
    worker before."""

    def __init__(self, shard):
        self._shard = shard

    def ready(self) -> bool:
        return True

    def epoch(self, batch_days: int, prefetch_batches: int, drop_last: bool, per_object: int,
              shuffle_seed: int | None = None):
        """One pass, `per_object` batches per object (the last object may hold fewer)."""
        chunk = []
        for batch in batches_of_days(self._shard, batch_days, prefetch_batches, drop_last, shuffle_seed):
            chunk.append(batch)
            if len(chunk) == per_object:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def start_feeder(shard):
    """A feeder for `shard` on this node (so batches reach the worker through shared memory)."""
    node = ray.get_runtime_context().get_node_id()
    feeder = BatchFeeder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(shard)
    ray.get(feeder.ready.remote())  # surface a failed start here, not at the first batch
    return feeder


class EpochStream:
    """One epoch of batches from a feeder, as iter_day_batches yields them. The feeder starts reading as
    soon as this is constructed, so a stream made before the caller needs it (the next epoch,
    during validation) is ready when it does.

    Batches travel BATCHES_PER_OBJECT to an object: fetching an object from the store has a fixed
    cost whatever its size, so fewer, larger objects cost the worker less; the feeder stays at
    most two objects ahead. A receiver thread waits for those objects and unpacks them, so the
    training thread only takes finished batches from a queue and never waits on a message between
    processes (on a busy machine every such message waits for a core). The receiver holds the GIL
    only briefly; the Python-heavy reading stays in the feeder.
    `close()` mid-epoch drains the rest, so the feeder's epoch call ends and the next epoch is not
    queued behind it. (Drained, not abandoned: a Ray Data execution cut off by killing the process
    that runs it keeps its resource reservation in Ray 2.60, and later executions in the cluster
    then wait forever for CPUs that are free.)"""

    def __init__(self, feeder, batch_days: int, *, prefetch_batches: int, drop_last: bool,
                 shuffle_seed: int | None = None):
        per_object = max(1, min(BATCHES_PER_OBJECT, prefetch_batches))
        self._refs = feeder.epoch.options(num_returns="streaming", _generator_backpressure_num_objects=2).remote(
            batch_days, prefetch_batches, drop_last, per_object, shuffle_seed)
        self._batches = InBackground(_unpacked(self._refs), depth=2 * per_object, name="feeder-receiver")

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self._batches)

    def close(self) -> None:
        self._batches.close(join_timeout=None)  # the receiver has left the refs: drain them here
        for _ in self._refs:
            pass


def _unpacked(refs) -> Iterator[dict]:
    for ref in refs:
        for batch in ray.get(ref):
            yield _writable(batch)


def stop_feeder(feeder) -> None:
    ray.kill(feeder, no_restart=True)


@contextlib.contextmanager
def feeder_for(shard, *, enabled: bool = True):
    """A feeder for `shard` for the duration of the block (None when not enabled), stopped on
    the way out whatever happens; an epoch it had started reading ahead is abandoned."""
    feeder = start_feeder(shard) if enabled else None
    try:
        yield feeder
    finally:
        if feeder is not None:
            stop_feeder(feeder)


def _writable(batch: dict) -> dict:
    """Arrays from the object store are read-only views of shared memory; torch.from_numpy
    warns on those. x is copied (a few hundred KB per day, tens of microseconds); the small
    arrays too, so that nothing the step touches aliases the store."""
    return {key: np.array(value) if isinstance(value, np.ndarray) and not value.flags.writeable else value
            for key, value in batch.items()}
