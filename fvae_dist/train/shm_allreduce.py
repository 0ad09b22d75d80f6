"""DDP's gradient average through shared memory, for CPU workers that share one machine.

    allreduce = SharedMemoryAllReduce.connect(parameters, timeout_s)   # collective; None = not here
    ddp_model.register_comm_hook(None, allreduce.hook)

Why: DDP averages each gradient bucket with one all-reduce per step. Over gloo (sockets) that
cost 3-5 ms a step on the 2-core development VM, 20-30% of a one-day fp32 step, though the
whole model's gradients are only 0.4 MB. Measured with 2 plain DDP processes, 1 thread each:
14.0 ms per step without any all-reduce, 17-19 ms with gloo's, 14.4 ms with this one. What is
slow is delivery right after a stretch of work, not bandwidth: a 4-byte gloo exchange took
0.04 ms back to back but 2 ms (median) after 14 ms of pure-Python work on both sides, and the
400 KB exchange following such a tiny one took 0.16 ms. Shared memory needs no I/O thread to be
woken and scheduled.

How: one shared segment holds a slot per rank (twice: calls alternate between two halves) and a
counter per rank, each on its own cache line. For every bucket each rank
  1. copies its gradients into its slot,
  2. publishes the call number in its counter (a release store, native/shm_sync.cpp),
  3. waits until every counter has reached that call (spin, then yield, then short naps),
  4. sums all slots in rank order and divides by the world size.
Every rank adds the same numbers in the same order, so the replicas stay bitwise identical, as
with gloo. Two halves make reuse safe: a rank can only start call c+2 (the same half as call c)
after every rank published call c+1, which each does after it finished reading call c.

The same segment carries the training loop's per-step "every worker still has a batch" flag
(train/loop.py, LockstepBatches), which otherwise is one more gloo all-reduce a step: each rank
publishes 2*call + have in its flag line and waits for every rank's call. Flags alternate
between two words per rank by the parity of the call, for the reason the halves do: a rank
publishes flag call c+1 only after it has read every flag of call c, so the word of call c
cannot be overwritten (by call c+2) while a rank is still reading it.

Where: only when every rank can map the segment rank 0 created (checked with a random token,
so two hosts with the same name cannot fool it) and the native counters build. Otherwise,
multi-node clusters and GPUs included, DDP keeps its process group's all-reduce.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from fvae_dist.native.build import load_shm_sync

CACHE_LINE = 64
SHM_DIR = Path("/dev/shm")
TOKEN_BYTES = 16


class SharedMemoryAllReduce:
    """DDP communication hook (`hook`) averaging the gradients over shared memory, and the
    lockstep flag channel (`send_flag`, `all_have`) for the training loop."""

    def __init__(self, mapping: mmap.mmap, layout: _Layout, rank: int, lib: ctypes.CDLL, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, layout.world, timeout_s
        self._mapping, self._lib = mapping, lib  # the views below keep the mapping alive too
        self._calls = 0
        self._flag_calls = 0
        whole = torch.frombuffer(mapping, dtype=torch.uint8)
        self._address = whole.data_ptr()                               # the counters start here
        self._flag_address = self._address + layout.flag_offset        # then the flag lines
        # halves[h] is (world, slot_numel): one slot per rank
        self._halves = [whole[layout.half_offset(h): layout.half_offset(h) + layout.half_bytes]
                        .view(layout.dtype)[: layout.world * layout.slot_numel].view(layout.world, layout.slot_numel)
                        for h in (0, 1)]

    @classmethod
    def connect(cls, parameters, timeout_s: float) -> SharedMemoryAllReduce | None:
        """Collective over the default process group: every rank calls it. None, on every rank,
        when any rank cannot share memory with rank 0 (the reasons are warned about once)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        grads = [p for p in parameters if p.requires_grad]
        dtypes = {p.dtype for p in grads}
        lib = load_shm_sync()
        problem = None
        if world < 2:
            problem = "one rank has nothing to average"
        elif len(dtypes) != 1 or any(p.device.type != "cpu" for p in grads):
            problem = "parameters are not all CPU tensors of one dtype"
        elif lib is None:
            problem = "native/shm_sync.cpp could not be built"
        layout = _Layout(world, sum(p.numel() for p in grads), dtypes.pop() if len(dtypes) == 1 else torch.float32)

        offer = [None]
        if rank == 0 and problem is None:
            offer[0], problem = _create_segment(layout)
        dist.broadcast_object_list(offer, src=0)
        mapping = None
        if offer[0] is not None and problem is None:
            mapping, problem = _attach(*offer[0], layout)
        problems = [None] * world
        dist.all_gather_object(problems, problem)  # also the barrier before rank 0 unlinks
        if rank == 0 and offer[0] is not None:
            os.unlink(offer[0][0])  # every rank holds its mapping; nothing is left in /dev/shm
        failed = {r: p for r, p in enumerate(problems) if p is not None}
        if failed:  # rank 0 among them when it made no segment
            if mapping is not None:
                mapping.close()
            if rank == 0:
                warnings.warn("gradient all-reduce through the process group (gloo): shared memory unavailable: "
                              + "; ".join(f"rank {r}: {p}" for r, p in failed.items()), RuntimeWarning, stacklevel=2)
            return None
        return cls(mapping, layout, rank, lib, timeout_s)

    def hook(self, state, bucket):  # -> Future[Tensor]; DDP rejects string annotations
        grads = bucket.buffer()                                        # this rank's flat bucket
        n = grads.numel()
        self._calls += 1
        slots = self._halves[self._calls % 2]                          # (world, slot_numel)
        slots[self.rank, :n].copy_(grads)
        self._lib.fvae_shm_publish(self._address + self.rank * CACHE_LINE, self._calls)
        if self._lib.fvae_shm_wait_all(self._address, CACHE_LINE, self.world, self._calls,
                                       int(self.timeout_s * 1e9)) != 0:
            raise RuntimeError(f"shared-memory all-reduce: rank {self.rank} waited {self.timeout_s:.0f} s for "
                               f"the other {self.world - 1} rank(s) to reach gradient bucket call {self._calls}")
        torch.add(slots[0, :n], slots[1, :n], out=grads)               # rank order, same on every rank
        for other in range(2, self.world):
            grads.add_(slots[other, :n])
        grads.div_(self.world)
        done = torch.futures.Future()
        done.set_result(grads)
        return done

    def send_flag(self, have: bool) -> int:
        """Publish this rank's flag for the next lockstep call; returns the call number for
        all_have. Never blocks: peers read it whenever they get there."""
        self._flag_calls += 1
        parity = self._flag_calls % 2
        self._lib.fvae_shm_publish(self._flag_address + self.rank * CACHE_LINE + parity * 8,
                                   2 * self._flag_calls + int(have))
        return self._flag_calls

    def all_have(self, call: int) -> bool:
        """True when every rank sent have=True for `call` (waits until all have sent it)."""
        words = self._flag_address + (call % 2) * 8                   # each rank's word of this parity
        if self._lib.fvae_shm_wait_all(words, CACHE_LINE, self.world, 2 * call, int(self.timeout_s * 1e9)) != 0:
            raise RuntimeError(f"shared-memory step flags: rank {self.rank} waited {self.timeout_s:.0f} s for "
                               f"the other {self.world - 1} rank(s) to reach lockstep flag call {call}")
        return bool(self._lib.fvae_shm_all_equal(words, CACHE_LINE, self.world, 2 * call + 1))


class _Layout:
    """Byte layout of the segment: gradient counters (one cache line per rank), flag lines (one
    cache line per rank, two words used), the token, then two halves of `world` slots of
    `slot_numel` elements, each half page-aligned."""

    def __init__(self, world: int, slot_numel: int, dtype: torch.dtype):
        self.world, self.slot_numel, self.dtype = world, max(slot_numel, 1), dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.counter_bytes = _round_up(2 * world * CACHE_LINE + TOKEN_BYTES, mmap.PAGESIZE)
        self.half_bytes = _round_up(world * self.slot_numel * itemsize, mmap.PAGESIZE)
        self.total_bytes = self.counter_bytes + 2 * self.half_bytes

    def half_offset(self, half: int) -> int:
        return self.counter_bytes + half * self.half_bytes

    @property
    def flag_offset(self) -> int:
        return self.world * CACHE_LINE

    @property
    def token_offset(self) -> int:
        return 2 * self.world * CACHE_LINE


def _create_segment(layout: _Layout) -> tuple[tuple[str, bytes] | None, str | None]:
    """Rank 0: a zeroed file in /dev/shm with a random token after the counters."""
    size = layout.total_bytes
    if not SHM_DIR.is_dir():
        return None, f"{SHM_DIR} does not exist"
    try:
        handle, path = tempfile.mkstemp(prefix="fvae-dist-allreduce-", dir=SHM_DIR)
    except OSError as error:
        return None, f"cannot create a file in {SHM_DIR}: {error}"
    try:
        try:
            # allocate the pages now: a tmpfs too small for them (Docker's default /dev/shm is
            # 64 MB) fails here with ENOSPC instead of killing a worker with SIGBUS mid-step
            os.posix_fallocate(handle, 0, size)
            token = secrets.token_bytes(TOKEN_BYTES)
            os.pwrite(handle, token, layout.token_offset)
        finally:
            os.close(handle)
    except OSError as error:
        os.unlink(path)
        return None, f"cannot allocate a {size}-byte segment in {SHM_DIR}: {error}"
    return (path, token), None


def _attach(path: str, token: bytes, layout: _Layout) -> tuple[mmap.mmap | None, str | None]:
    """Map rank 0's segment and check its token: a different machine has no such file, or not
    this token in it."""
    try:
        with open(path, "r+b") as handle:
            mapping = mmap.mmap(handle.fileno(), layout.total_bytes)
    except (OSError, ValueError) as error:
        return None, f"cannot map {path}: {error}"
    offset = layout.token_offset
    if mapping[offset: offset + TOKEN_BYTES] != token:
        mapping.close()
        return None, f"{path} is not rank 0's segment (another machine?)"
    return mapping, None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
