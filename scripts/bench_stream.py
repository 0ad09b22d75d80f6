"""The training split in Ray Data at the paper's scale: object store bytes, spilling, time, memory.

    python scripts/bench_stream.py --dataset /work/exp/data/cn_all [--out bench/stream.json]
        [--code DIR] [--days-per-block G] [--epochs 1]

Measures, on one local Ray cluster of this machine's CPUs and Ray's default object store:
  * the materialised training split: its bytes (Dataset.size_bytes() and the object store's own
    count before and after), against the day-level feature table (stock-days x features x 4 B);
  * whether the object store spilled (its spill counters, and the "Spilled ... MiB" lines of
    this cluster's raylet log) and the materialize wall time;
  * one consumer pulling whole epochs the way a training worker does: the block-order shuffle,
    streaming_split(1, equal=True), a feeder actor (data/feeder.py) that cuts and pads one day per
    batch, the batches fetched here; stock-days/s;
  * peak RSS (VmHWM) and peak anonymous RSS (sampled) of this driver and of the feeder process.
--code DIR measures the fvae_dist of another checkout (default: this repository), e.g. one from
before the day-panel blocks, whose rows were days with their windows: its training split is built
as its trainer built it (day_dataset, then grouped_days).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a prepared data set (fvae-dist prepare)")
    parser.add_argument("--out", default=str(REPO / "bench" / "stream.json"))
    parser.add_argument("--code", default=str(REPO), help="the checkout whose fvae_dist is measured")
    parser.add_argument("--days-per-block", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="consumer epochs to time")
    parser.add_argument("--split", default="train")
    parser.add_argument("--object-store-bytes", type=int, default=None,
                        help="the object store's size (default: Ray's, 30%% of the memory available at start)")
    args = parser.parse_args()
    args.dataset, code = str(Path(args.dataset).resolve()), str(Path(args.code).resolve())
    args.out = str(Path(args.out).resolve())
    # Ray's workers import from the driver's working directory first: run from the measured checkout
    os.chdir(code)
    sys.path.insert(0, code)

    import ray

    import fvae_dist
    from fvae_dist.data import stream
    from fvae_dist.data.feeder import EpochStream, feeder_for
    from fvae_dist.data.shards import load_manifest

    manifest = load_manifest(args.dataset)
    split = dict(manifest["splits"][args.split])
    split.setdefault("n_stock_days", universe_stock_days(args.dataset, manifest, args.split))
    day_level_bytes = int(split["n_stock_days"]) * len(manifest["features"]) * 4
    row = {"date": time.strftime("%Y-%m-%d"), "dataset": str(Path(args.dataset).resolve()), "split": args.split,
           "code": str(Path(fvae_dist.__file__).resolve().parents[1]), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "days": int(split["n_days"]), "stock_days": int(split["n_stock_days"]),
           "features": len(manifest["features"]), "seq_len": int(manifest["seq_len"]),
           "days_per_block": args.days_per_block, "day_level_bytes": day_level_bytes}
    path_kind = "day_panel_blocks" if hasattr(stream, "day_blocks") else "day_rows_with_windows"
    row["rows"] = path_kind
    print(f"{row['code']}: {path_kind}, {args.split} split of {args.dataset}: {row['days']} days, "
          f"{row['stock_days']:,} stock-days, day-level features {day_level_bytes / 2**30:.2f} GiB")

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=args.object_store_bytes, runtime_env={"env_vars": {"PYTHONPATH": code}})
    driver = PeakMemory(os.getpid())
    try:
        row["worker_code"] = ray.get(ray.remote(num_cpus=0)(_imported_code).remote())
        if row["worker_code"] != row["code"]:
            raise SystemExit(f"Ray's workers import fvae_dist from {row['worker_code']}, not from {row['code']}")
        before = store_stats()
        row["object_store_capacity_bytes"] = before["capacity"]
        started = time.perf_counter()
        ds = training_split(stream, args.dataset, args.split, args.days_per_block)
        row["materialize_seconds"] = time.perf_counter() - started
        after = store_stats()
        row["dataset_size_bytes"] = int(ds.size_bytes())
        row["ray_blocks"] = int(ds.num_blocks())
        row["object_store_used_bytes_before"] = before["used"]
        row["object_store_used_bytes_after"] = after["used"]
        row["object_store_primary_bytes_after"] = after["primary"]
        row["spilled_bytes"] = after["spilled"] - before["spilled"]
        row["spilled_objects"] = after["spilled_objects"] - before["spilled_objects"]
        row["size_over_day_level"] = row["dataset_size_bytes"] / day_level_bytes
        print(f"materialized in {row['materialize_seconds']:.0f} s: {row['dataset_size_bytes'] / 2**30:.2f} GiB "
              f"({row['size_over_day_level']:.2f}x day-level) in {row['ray_blocks']} blocks; store "
              f"{after['used'] / 2**30:.2f} of {after['capacity'] / 2**30:.2f} GiB used, "
              f"spilled {row['spilled_bytes'] / 2**20:,.0f} MiB")

        shard = stream.shuffled_each_epoch(ds, seed=0).streaming_split(1, equal=True)[0]
        with feeder_for(shard) as feeder:
            feeder_memory = PeakMemory(ray.get(feeder.__ray_call__.remote(lambda _self: os.getpid())))
            epochs = []
            for epoch in range(args.epochs):
                started, stock_days, days = time.perf_counter(), 0, 0
                for batch in EpochStream(feeder, 1, prefetch_batches=4, drop_last=True, shuffle_seed=epoch):
                    stock_days += int(batch["mask"].sum())
                    days += len(batch["date"])
                seconds = time.perf_counter() - started
                epochs.append({"seconds": seconds, "days": days, "stock_days": stock_days,
                               "stock_days_per_s": stock_days / seconds})
                print(f"consumer epoch {epoch}: {days} days, {stock_days:,} stock-days in {seconds:.0f} s, "
                      f"{stock_days / seconds:,.0f} stock-days/s")
            row["feeder_peak"] = feeder_memory.stop()
        row["consumer_epochs"] = epochs
        row["consumer_stock_days_per_s"] = max(e["stock_days_per_s"] for e in epochs)
        final = store_stats()
        row["spilled_bytes_total"] = final["spilled"] - before["spilled"]
        row["restored_bytes_total"] = final["restored"] - before["restored"]
        row["raylet_spill_lines"] = raylet_spill_lines()
    finally:
        row["driver_peak"] = driver.stop()
        ray.shutdown()
    print(f"peak RSS: driver {row['driver_peak']['vm_hwm_bytes'] / 2**30:.2f} GiB, feeder "
          f"{row.get('feeder_peak', {}).get('vm_hwm_bytes', 0) / 2**30:.2f} GiB; spilled in all "
          f"{row.get('spilled_bytes_total', 0) / 2**20:,.0f} MiB; raylet log: {len(row.get('raylet_spill_lines', []))} "
          "spill lines")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(f"wrote {out}")


def _imported_code() -> str:
    import fvae_dist

    return str(Path(fvae_dist.__file__).resolve().parents[1])


def training_split(stream, dataset: str, split: str, days_per_block: int):
    """The materialised training split as the measured checkout's trainer builds it."""
    if hasattr(stream, "day_blocks"):
        return stream.day_blocks(dataset, split, days_per_block=days_per_block)
    # before the day-panel blocks: day rows with their windows, re-cut into random groups
    return stream.grouped_days(stream.day_dataset(dataset, split), days_per_block, seed=0)


def universe_stock_days(dataset: str, manifest: dict, split: str) -> int:
    """The split's universe stock-days, counted in its shards (older manifests do not say)."""
    import numpy as np
    import pyarrow.parquet as pq

    total = 0
    for entry in manifest["shards"]:
        if entry["split"] == split:
            table = pq.read_table(Path(dataset) / entry["path"], columns=["date", "in_universe"]).to_pandas()
            dates = table["date"].to_numpy(dtype="datetime64[D]")
            own = (dates >= np.datetime64(entry["own_start"])) & (dates <= np.datetime64(entry["own_end"]))
            total += int((own & table["in_universe"].to_numpy(dtype=bool)).sum())
    return total


def store_stats() -> dict:
    """This cluster's object store counters (the raylet's, as `ray memory --stats-only` reads them)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return {"used": int(stats.object_store_bytes_used), "primary": int(stats.object_store_bytes_primary_copy),
            "capacity": int(stats.object_store_bytes_avail), "spilled": int(stats.spilled_bytes_total),
            "spilled_objects": int(stats.spilled_objects_total), "restored": int(stats.restored_bytes_total)}


def raylet_spill_lines() -> list[str]:
    """The raylet's "Spilled ... MiB" log lines of this cluster (not another on this machine)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    lines = []
    for path in sorted(logs.glob("raylet*.out")):
        lines += [line.strip() for line in path.read_text(errors="replace").splitlines()
                  if re.search(r"Spilled \d+ MiB", line)]
    return lines


class PeakMemory:
    """Peak RSS of a process: the kernel's VmHWM, and its anonymous part sampled every 0.2 s
    (VmHWM also counts the object store's shared pages a process touched)."""

    def __init__(self, pid: int):
        self.pid, self.peak_anon, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _status(self) -> dict:
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0]) * 1024
        return fields

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_anon = max(self.peak_anon, self._status().get("RssAnon", 0))
            except OSError:
                return
            self._stop.wait(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        status = self._status()
        return {"pid": self.pid, "vm_hwm_bytes": status.get("VmHWM", 0), "peak_rss_anon_bytes": self.peak_anon}


if __name__ == "__main__":
    main()
