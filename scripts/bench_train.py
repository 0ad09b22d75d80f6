"""Training throughput, end to end (input + step), at the paper's sizes: N~300, T=20, C=20, H=64, K=8, M=64.

    python scripts/bench_train.py [--quick] [--out bench/train.json] [--dataset DIR] [--skip-ray]

Measures, on a synthetic market prepared by `fvae-dist prepare` (cached under .bench/):
  * the 2048x2048 fp32 matmul ceiling (GFLOP/s) with 1 thread and with all cores
  * a plain single-process loop without Ray (days already decoded in memory, collate + step),
    fp32 vs bf16, 1 vs 4 days per step, 1 thread and all-cores threads; the second of two passes
    over the same batches is timed (steady state, as the Ray runs leave out their first epoch)
  * Ray Train (the real `train()`, DDP, Ray Data input) with 1 and 2 workers, same variants, and
    two 1-worker runs with data.feeder=false (Ray Data read in the worker's own threads) and two
    2-worker runs with train.allreduce=process_group (gradients averaged by gloo instead of
    through shared memory), each right beside a repeat of its shared-memory twin; 1-worker
    pinned / unpinned pairs (ray.pin_cores) and 2-worker pairs with one day per Ray Data block
    against the default data.days_per_block, back to back
  * one consumer pulling days out of Ray Data alone (no step), with 1 and with the default days
    per block
  * eq. 4's GRU alone (forward + backward at S=300, fp32 and bf16): torch.nn.GRU against the
    models' FusedGRU, the share of the step that the GRU bounds
  * FactorVAE's loss after eq. 4 alone (eqs. 5-17, forward + backward at N=300, fp32): the
    reference modules against the fused native pass (models/fused_head.py), with its three
    products inside the native call and through torch
  * the 1-thread plain loop beside a busy neighbour process on the other core (compute-bound,
    then memory-bound): how much of Ray's overhead is shared cache and memory bandwidth
  * Ray's overhead against the plain loop at the same core count (the plain rows' best of three,
    and the mean of a plain run of the same setting right before and right after the Ray run,
    which the machine's drift over the quarter of an hour cannot skew), the fraction of the epoch the
    workers wait for input, achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode on one
    training step) against the matmul ceiling, and the per-core rate against the 20,000
    stock-days/s target.
Writes one JSON document and prints a short table. What bf16 does to quality (test Rank IC, seed by
seed) is scripts/bench_precision.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fvae_dist.config import DataConfig, load_config, write_text_atomic  # noqa: E402
from fvae_dist.data.shards import collate_days, iter_shard_days, load_manifest, shard_entries  # noqa: E402
from fvae_dist.train.cpu_memory import keep_freed_memory  # noqa: E402

TARGET_PER_CORE = 20_000
WORK = REPO / ".bench" / "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller market, fewer variants (a few minutes)")
    parser.add_argument("--out", default=str(REPO / "bench" / "train.json"))
    parser.add_argument("--dataset", default=None, help="a prepared data set to use instead of generating one")
    parser.add_argument("--skip-ray", action="store_true", help="only the plain loop and the matmul ceiling")
    args = parser.parse_args()
    keep_freed_memory()  # as the training workers do

    cores = os.cpu_count() or 1
    dataset = Path(args.dataset) if args.dataset else prepare_market(days=320 if args.quick else 600)
    days = load_days(dataset)
    mean_n = float(np.mean([len(d.instruments) for d in days]))
    flops = train_flops_per_stock_day()
    ceiling = {"1_thread": matmul_gflops(1), f"{cores}_threads": matmul_gflops(cores)}
    print(f"data: {len(days)} train days, mean N {mean_n:.0f}; {flops / 1e6:.2f} MFLOP per stock-day (train step)")
    print(f"matmul 2048^2 fp32 ceiling: {ceiling}")

    gru = gru_kernels(repeats=2 if args.quick else 3)
    head = head_kernel(repeats=2 if args.quick else 3)

    plain_variants = [(p, d, t) for t in sorted({1, cores}) for p in ("fp32", "bf16") for d in (1, 4)]
    if args.quick:
        plain_variants = [v for v in plain_variants if v[2] == 1 or (v[0] == "fp32" and v[1] == 1)]
    # This machine may be shared: each variant runs `repeats` times, interleaved, and keeps its best.
    repeats = 2 if args.quick else 3
    runs = [[plain_loop(days, precision=p, batch_days=d, threads=t, max_steps=12 if args.quick else 40)
             for p, d, t in plain_variants] for _ in range(repeats)]
    plain = [max(attempts, key=lambda row: row["stock_days_per_s"]) for attempts in zip(*runs)]
    for row, attempts in zip(plain, zip(*runs)):
        row["attempts_stock_days_per_s"] = [a["stock_days_per_s"] for a in attempts]
    neighbours = neighbour_sensitivity(days, max_steps=12 if args.quick else 40) if cores > 1 else None
    data_only = ray_data_only(dataset) if not args.skip_ray else None

    ray_results = []
    if not args.skip_ray:
        ray_variants = [dict(workers=w, precision=p, batch_days=d)
                        for w in (1, 2) for p in ("fp32", "bf16") for d in (1, 4)]
        # the same with each worker reading Ray Data in its own threads instead of a feeder actor
        ray_variants += [dict(workers=1, precision="fp32", batch_days=1, feeder=False),
                         dict(workers=1, precision="bf16", batch_days=4, feeder=False)]
        # 2 workers, one day per step, with DDP's gloo all-reduce instead of the shared-memory
        # one (train/shm_allreduce.py), each run right beside a repeat of its shared-memory twin:
        # this machine drifts by 10% within the benchmark's quarter of an hour
        for precision in ("fp32", "bf16"):
            ray_variants += [dict(workers=2, precision=precision, batch_days=1, allreduce=allreduce, ab_twin=True)
                             for allreduce in ("process_group", "auto")]
        # 1 worker, one day per step, with its training thread pinned to a core of its own and
        # Ray's other processes on the rest (ray.pin_cores, the default where it fits) against
        # neither, pairs back to back: each kind of run needs its own local cluster
        for precision, pairs in (("fp32", 2), ("bf16", 1)):
            ray_variants += [dict(workers=1, precision=precision, batch_days=1, pin=pin, pin_twin=True)
                             for _ in range(pairs) for pin in (False, True)]
        # 2 workers, one day per step, with one day per Ray Data block (each worker asks Ray Data's
        # split coordinator for every day) against the default data.days_per_block, back to back
        for precision, pairs in (("fp32", 2), ("bf16", 1)):
            ray_variants += [dict(workers=2, precision=precision, batch_days=1, days_per_block=g, block_twin=True)
                             for _ in range(pairs) for g in (1, DataConfig.days_per_block)]
        if args.quick:
            ray_variants = [dict(workers=1, precision="fp32", batch_days=1),
                            dict(workers=2, precision="fp32", batch_days=1),
                            dict(workers=2, precision="bf16", batch_days=1)]
        cluster = None
        for variant in ray_variants:
            cluster = start_cluster_for(variant, cores, running=cluster)
            # The plain loop of the same setting right before and right after the run: Ray's
            # overhead is also stated against these, as the machine drifts by 10% or more between
            # the plain rows above and a Ray run a quarter of an hour later.
            twin = dict(precision=variant["precision"], batch_days=variant["batch_days"],
                        threads=min(variant["workers"], cores), max_steps=12 if args.quick else 40)
            before = plain_loop(days, **twin)
            row = ray_run(dataset, cores=cores, epochs=2 if args.quick else 3, **variant)
            after = plain_loop(days, **twin)
            row["adjacent_plain_stock_days_per_s"] = [before["stock_days_per_s"], after["stock_days_per_s"]]
            ray_results.append(row)
        stop_cluster()
    for row in plain + ray_results:
        row["gflops"] = row["stock_days_per_s"] * flops / 1e9
        row["fraction_of_matmul_ceiling"] = row["gflops"] / (ceiling["1_thread"] * row["cores"])
        row["stock_days_per_s_per_core"] = row["stock_days_per_s"] / row["cores"]
        row["meets_target_per_core"] = row["stock_days_per_s_per_core"] >= TARGET_PER_CORE
    overhead = ray_overhead(plain, ray_results)
    report = {
        "what": "FactorVAE training throughput, stock-days per second, input + step",
        "machine": {"cpus": cores, "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "sizes": {"mean_N": mean_n, "T": 20, "C": 20, "H": 64, "K": 8, "M": 64, "train_days": len(days)},
        "train_flops_per_stock_day": flops,
        "matmul_ceiling_gflops": ceiling,
        "target_stock_days_per_s_per_core": TARGET_PER_CORE,
        "gru_forward_backward": gru,
        "head_forward_backward": head,
        "plain_loop": plain,
        "ray_train": ray_results,
        "ray_overhead_vs_plain": overhead,
        "ray_data_input_only": data_only,
        "plain_loop_beside_a_neighbour": neighbours,
        "load_average_1m_at_end": os.getloadavg()[0],
        "quick": args.quick,
    }
    write_text_atomic(args.out, json.dumps(report, indent=1))
    print_table(plain, ray_results, overhead)
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------------------------
# Data and FLOPs
# ----------------------------------------------------------------------------------------------

def prepare_market(days: int) -> Path:
    from fvae_dist.data.bars import open_source
    from fvae_dist.data.prepare import prepare_dataset

    out = WORK / f"synthetic-300x{days}"
    started = time.perf_counter()
    result = prepare_dataset(open_source(f"synthetic:stocks=300,days={days},seed=0"), out, progress=False)
    print(f"data set {out} ({'reused' if result.reused else f'prepared in {time.perf_counter() - started:.0f} s'})")
    return out


def load_days(dataset: Path) -> list:
    manifest = load_manifest(dataset)
    return [day for entry in shard_entries(manifest, "train")
            for day in iter_shard_days(dataset, entry, drop_nan_label=True, manifest=manifest)]


def model_config(precision: str = "fp32", batch_days: int = 1, extra: tuple = ()):
    return load_config(None, ["model.num_features=20", "model.hidden_size=64", "model.num_factors=8", "model.num_portfolios=64",
                              f"train.precision={precision}", f"data.batch_days={batch_days}", *extra])


def train_flops_per_stock_day() -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from fvae_dist.models.factorvae import build_model

    model = build_model(model_config().model)
    # FlopCounterMode counts torch's ops: the GRU's native time loop and the fused loss's native
    # call run their products outside torch, so count them on the paths that run the same
    # products through torch
    model.feature_extractor.gru.native_time_loop = False
    x, mask, y = torch.randn(1, 300, 20, 20), torch.ones(1, 300, dtype=torch.bool), torch.randn(1, 300)
    with fused_loss_products(native=False), FlopCounterMode(display=False) as counter:
        model(x, mask, y)["loss"].backward()
    return counter.get_total_flops() / 300


@contextlib.contextmanager
def fused_loss_products(native: bool):
    """The fused loss's three products inside its native call (native=True) or through torch,
    for the duration of the block (models/fused_head.py, native_products)."""
    from fvae_dist.models import fused_head

    previous, fused_head.native_products = fused_head.native_products, native
    try:
        yield
    finally:
        fused_head.native_products = previous


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 6) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    elapsed = (time.perf_counter() - started) / repeats
    torch.set_num_threads(previous)
    return 2 * size**3 / elapsed / 1e9


# ----------------------------------------------------------------------------------------------
# The GRU alone, the loss after it alone
# ----------------------------------------------------------------------------------------------

def gru_kernels(repeats: int, stocks: int = 300, steps: int = 20, hidden: int = 64) -> list:
    """Forward + backward of eq. 4's GRU alone on one day's stocks, one thread: torch.nn.GRU
    against the models' FusedGRU (same weights), its time loop in native code ("fused", fp32
    only, as the models run it) and in Python ("fused-python-loop"), fp32 and bf16, attempts
    interleaved."""
    from fvae_dist.models.fused_gru import FusedGRU
    from fvae_dist.native.build import load_gru_kernels, torch_sgemm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    grus = {"torch": torch.nn.GRU(hidden, hidden, batch_first=True)}
    if load_gru_kernels() is not None:
        for name, native_loop in (("fused", True), ("fused-python-loop", False)):
            grus[name] = FusedGRU(hidden, hidden, batch_first=True)
            grus[name].load_state_dict(grus["torch"].state_dict())
            grus[name].native_time_loop = native_loop
    x = torch.randn(stocks, steps, hidden, requires_grad=True)
    # bf16 has no native time loop: "fused" under bf16 runs the Python loop, so it is timed once
    native_loop_runs = torch_sgemm() is not None
    cases = [(name, p) for name in grus for p in ("fp32", "bf16")
             if not (name == "fused-python-loop" and (p == "bf16" or not native_loop_runs))]
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):  # best of: the machine may be shared
        for (name, precision) in best:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                for _ in range(3):
                    grus[name](x)[1].sum().backward()
                started = time.perf_counter()
                for _ in range(20):
                    grus[name](x)[1].sum().backward()
            best[(name, precision)] = min(best[(name, precision)], (time.perf_counter() - started) / 20)
    rows = []
    for (name, precision), seconds in best.items():
        loop = "native" if name == "fused" and precision == "fp32" and native_loop_runs else \
            "python" if name.startswith("fused") else "torch"
        rows.append({"implementation": name, "precision": precision, "time_loop": loop, "stocks": stocks,
                     "ms": 1e3 * seconds, "stock_days_per_s": stocks / seconds})
        print(f"gru    {name:17s} {precision} ({loop} loop): {1e3 * seconds:.2f} ms fwd+bwd for {stocks} stocks "
              f"({stocks / seconds:,.0f} stock-days/s for the GRU alone)")
    return rows


def head_kernel(repeats: int, stocks: int = 300) -> list:
    """Forward + backward of FactorVAE's loss after eq. 4 (eqs. 5-17) alone on one day's stocks,
    one thread: the reference modules (FactorVAE._loss) against the fused native pass
    (models/fused_head.py), the latter with its products inside the native call ("fused") and
    through torch ("fused-torch-products"); same weights and batch, attempts interleaved."""
    from fvae_dist.models.factorvae import ATTENTION_EPS, build_model
    from fvae_dist.models.fused_head import fused_loss, fused_loss_applies
    from fvae_dist.native.build import torch_sgemm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_config().model).train()
    e = torch.randn(1, stocks, model.cfg.hidden_size, requires_grad=True)
    mask = torch.ones(1, stocks, dtype=torch.bool)
    y = 0.02 * torch.randn(1, stocks)
    paths = {"reference": lambda: model._loss(e, mask, y)}
    if fused_loss_applies(model, e):
        def fused(native_products: bool):
            def run():
                with fused_loss_products(native=native_products):
                    return fused_loss(model, e, mask, y, ATTENTION_EPS)
            return run
        if torch_sgemm() is not None:
            paths["fused"] = fused(True)
        paths["fused-torch-products"] = fused(False)
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):  # best of: the machine may be shared
        for name, loss in paths.items():
            for timed in (False, True):
                started = time.perf_counter()
                for _ in range(50):
                    model.zero_grad(set_to_none=True)
                    loss()["loss"].backward()
                if timed:
                    best[name] = min(best[name], (time.perf_counter() - started) / 50)
    rows = []
    for name, seconds in best.items():
        rows.append({"implementation": name, "stocks": stocks, "ms": 1e3 * seconds})
        print(f"head   {name:20s}: {1e3 * seconds:.2f} ms fwd+bwd of eqs. 5-17 for {stocks} stocks")
    return rows


# ----------------------------------------------------------------------------------------------
# Plain loop: no Ray, no DDP, the same model, optimizer and precision switch
# ----------------------------------------------------------------------------------------------

def plain_loop(days: list, *, precision: str, batch_days: int, threads: int, max_steps: int) -> dict:
    from fvae_dist.models.factorvae import build_model
    from fvae_dist.train.engine import DDPEngine

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_config(precision, batch_days)
    engine = DDPEngine(build_model(cfg.model), cfg, torch.device("cpu"), world_size=1)
    # Two passes, the second one timed: like the Ray runs, whose first epoch is left out, this
    # measures the steady state of an epoch loop. The first pass meets most batch shapes (stocks
    # per day vary) for the first time, and oneDNN builds its bf16 kernels per shape. The timed
    # pass groups the days afresh, as every Ray epoch reshuffles them: replaying the warm-up's
    # exact batches would flatter the plain loop at several days per step, whose batch shapes
    # (sums of several days' stock counts) then repeat exactly.
    data_s = step_s = 0.0
    stock_days = steps = 0
    rng = np.random.default_rng(0)
    for timed in (False, True):
        order = rng.permutation(len(days))
        groups = [order[i : i + batch_days] for i in range(0, len(order) - batch_days + 1, batch_days)][:max_steps]
        for group in groups:
            started = time.perf_counter()
            batch = collate_days([days[i] for i in group])
            x, mask, y = (torch.from_numpy(batch[k]) for k in ("x", "mask", "y"))
            collated = time.perf_counter()
            engine.train_step(x, mask, y)
            done = time.perf_counter()
            if timed:
                data_s += collated - started
                step_s += done - collated
                stock_days += int(batch["mask"].sum())
                steps += 1
    total = data_s + step_s
    row = {"kind": "plain", "precision": precision, "batch_days": batch_days, "threads": threads, "cores": threads,
           "steps": steps, "stock_days_per_s": stock_days / total, "data_wait_fraction": data_s / total,
           "step_ms": 1e3 * step_s / steps}
    print(f"plain  threads={threads} {precision} D={batch_days}: {row['stock_days_per_s']:,.0f} stock-days/s "
          f"(data {100 * row['data_wait_fraction']:.1f}%)")
    return row


# ----------------------------------------------------------------------------------------------
# Ray Train: the product's train() with a fresh run folder
# ----------------------------------------------------------------------------------------------

def cpus_per_worker_for(workers: int, cores: int) -> float:
    # On `cores` CPUs the workers together may hold cores - 1, leaving one to Ray Data.
    return max(min(1.0, (cores - 1) / workers), 0.25)


def ray_cluster_config(workers: int, cores: int, extra: tuple = ()):
    return model_config("fp32", 1, ("train.torch_threads=1", f"ray.num_workers={workers}",
                                    f"ray.cpus_per_worker={cpus_per_worker_for(workers, cores)}", *extra))


def start_cluster_for(variant: dict, cores: int, running: str | None) -> str:
    """The local cluster `fvae-dist train` would start for this run: with the cores laid out
    (training thread pinned, Ray's other processes on the rest: train/core_layout.py) where that
    fits and the variant does not turn it off, else a plain one. Restarts Ray only when the kind
    changes; returns the kind now running."""
    from fvae_dist.train.trainer import ensure_ray, planned_core_layout

    pin = variant.get("pin", True)
    cfg = ray_cluster_config(variant["workers"], cores, (f"ray.pin_cores={str(pin).lower()}",))
    kind = "pinned" if pin and planned_core_layout(cfg) is not None else "plain"
    if kind != running:
        stop_cluster()
        ensure_ray(cfg, for_one_run=kind == "pinned")
    return kind


def stop_cluster() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def ray_run(dataset: Path, *, workers: int, precision: str, batch_days: int, cores: int, epochs: int,
            feeder: bool = True, allreduce: str = "auto", ab_twin: bool = False, pin: bool = True,
            pin_twin: bool = False, days_per_block: int | None = None, block_twin: bool = False) -> dict:
    """One train() run; ab_twin marks the back-to-back gloo / shared-memory pairs, pin_twin the
    pinned / unpinned ones, block_twin those with one day / several days per Ray Data block."""
    from fvae_dist.train.trainer import train

    days_per_block = days_per_block or DataConfig.days_per_block

    name = (f"ray-w{workers}-{precision}-d{batch_days}" + ("" if feeder else "-nofeeder")
            + (f"-ab-{allreduce}" if ab_twin else "") + (f"-pin-{str(pin).lower()}" if pin_twin else "")
            + (f"-g{days_per_block}" if block_twin else ""))
    storage = WORK / "runs"
    shutil.rmtree(storage / name, ignore_errors=True)
    cpus_per_worker = cpus_per_worker_for(workers, cores)
    cfg = model_config(precision, batch_days, (
        f"data.dataset_dir={dataset}", f"train.epochs={epochs}", "train.early_stopping_patience=0",
        "train.keep_checkpoints=1", "train.torch_threads=1", f"ray.num_workers={workers}",
        f"ray.cpus_per_worker={cpus_per_worker}", f"ray.storage_path={storage}", f"ray.run_name={name}",
        f"data.feeder={str(feeder).lower()}", f"train.allreduce={allreduce}", f"ray.pin_cores={str(pin).lower()}",
        f"data.days_per_block={days_per_block}",
    ))
    started = time.perf_counter()
    metrics = train(cfg).metrics
    wall = time.perf_counter() - started
    training_cpus = metrics["history"][-1].get("perf_training_cpus") or ""
    steady = metrics["history"][1:] or metrics["history"]  # epoch 0 includes start-up of the input pipeline
    epoch_seconds = sum(h["perf_epoch_seconds"] for h in metrics["history"])
    row = {
        "kind": "ray", "workers": workers, "precision": precision, "batch_days": batch_days, "feeder": feeder,
        "allreduce": metrics["history"][-1].get("perf_allreduce"),
        "ab_twin": ab_twin, "pin_twin": pin_twin, "days_per_block": days_per_block, "block_twin": block_twin,
        "training_cpus": training_cpus,  # rank 0's training thread
        "pinned": bool(training_cpus) and len(training_cpus.split(",")) < (os.cpu_count() or 1),
        "preemptions_per_step": float(np.mean([h.get("perf_preemptions_per_step", float("nan")) for h in steady])),
        "cores": min(workers, cores), "threads_per_worker": 1, "cpus_per_worker": cpus_per_worker,
        "epochs": epochs,
        "stock_days_per_s": float(np.mean([h["perf_stock_days_per_s"] for h in steady])),
        "best_epoch_stock_days_per_s": float(max(h["perf_stock_days_per_s"] for h in steady)),
        "data_wait_fraction": float(np.mean([h["perf_data_wait_fraction"] for h in steady])),
        "step_fraction": float(np.mean([h.get("perf_step_fraction", float("nan")) for h in steady])),
        "step_ms": float(np.mean([1e3 * h["perf_epoch_seconds"] * h.get("perf_step_fraction", float("nan"))
                                  / max(h["train_steps"], 1) for h in steady])),
        "minor_faults_per_step": float(np.mean([h.get("perf_minor_faults_per_step", float("nan")) for h in steady])),
        "first_epoch_stock_days_per_s": metrics["history"][0]["perf_stock_days_per_s"],
        "run_wall_s": wall,
        "fixed_cost_s": wall - epoch_seconds,  # Ray start, data materialisation, validation, checkpoints
        "valid_rank_ic_last": metrics["history"][-1]["valid_rank_ic"],
    }
    print(f"ray    workers={workers} {precision} D={batch_days}{_variant_label(row)}: "
          f"{row['stock_days_per_s']:,.0f} stock-days/s "
          f"(data wait {100 * row['data_wait_fraction']:.1f}%, run {wall:.0f} s)")
    return row


def neighbour_sensitivity(days: list, max_steps: int) -> list:
    """The 1-thread plain loop alone, then with another process busy on the other core: one
    that only computes (a Python loop) and one that streams memory (copying 32 MB arrays).
    A Ray worker always has such neighbours (its feeder, Ray Data, the raylet): this separates
    what they cost through the shared cache and memory bandwidth from Ray's own overhead."""
    import subprocess

    hogs = {
        "compute": "import time\nt = time.time()\nwhile time.time() - t < 600: sum(range(10000))",
        "memory": ("import time, numpy as np\na = np.ones(8_000_000, np.float32); b = np.empty_like(a)\n"
                   "t = time.time()\nwhile time.time() - t < 600: np.copyto(b, a)"),
    }
    rows = []
    for precision, batch_days in (("fp32", 4), ("bf16", 4), ("bf16", 1)):
        row = {"precision": precision, "batch_days": batch_days}
        for neighbour in ("none", "compute", "memory"):
            hog = subprocess.Popen([sys.executable, "-c", hogs[neighbour]]) if neighbour != "none" else None
            try:
                time.sleep(0.5 if hog else 0)
                row[neighbour] = plain_loop(days, precision=precision, batch_days=batch_days, threads=1,
                                            max_steps=max_steps)["stock_days_per_s"]
            finally:
                if hog:
                    hog.kill()
                    hog.wait()
        row["slowdown_memory"] = 1.0 - row["memory"] / row["none"]
        row["slowdown_compute"] = 1.0 - row["compute"] / row["none"]
        print(f"neighbour {precision} D={batch_days}: alone {row['none']:,.0f}, beside a compute loop "
              f"{row['compute']:,.0f}, beside a memory copy loop {row['memory']:,.0f} stock-days/s")
        rows.append(row)
    return rows


def ray_data_only(dataset: Path) -> dict:
    """How fast one consumer pulls days out of the materialised Ray Dataset of day-panel blocks
    (windows cut, no model step), with one day per block and with training's default
    data.days_per_block: the input pipeline's ceiling, to compare with the step rate. (Object
    store bytes, spilling and memory at the paper's scale: scripts/bench_stream.py.)"""
    import ray

    from fvae_dist.data.stream import day_blocks, iter_day_batches, shuffled_each_epoch

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    row = {"days": load_manifest(dataset)["splits"]["train"]["n_days"]}
    for days_per_block in (1, DataConfig.days_per_block):
        ds = shuffled_each_epoch(day_blocks(dataset, "train", days_per_block=days_per_block), seed=0)
        rates = []
        for epoch in range(2):
            started, stock_days = time.perf_counter(), 0
            for batch in iter_day_batches(ds, 1, shuffle_seed=epoch):
                stock_days += int(batch["mask"].sum())
            rates.append(stock_days / (time.perf_counter() - started))
        row[f"stock_days_per_s_{days_per_block}_days_per_block"] = max(rates)
        print(f"ray data input only, {days_per_block} days per block: {max(rates):,.0f} stock-days/s")
        del ds
    ray.shutdown()
    row["stock_days_per_s"] = row[f"stock_days_per_s_{DataConfig.days_per_block}_days_per_block"]
    return row


def ray_overhead(plain: list, ray_results: list) -> list:
    """1 - Ray / plain at the same core count, precision and days per step."""
    rows = []
    for r in ray_results:
        match = [p for p in plain if p["threads"] == r["cores"] and p["precision"] == r["precision"]
                 and p["batch_days"] == r["batch_days"]]
        if match:
            rows.append({"workers": r["workers"], "cores": r["cores"], "precision": r["precision"],
                         "batch_days": r["batch_days"], "feeder": r["feeder"], "allreduce": r["allreduce"],
                         "ab_twin": r["ab_twin"], "pin_twin": r["pin_twin"], "pinned": r["pinned"],
                         "days_per_block": r["days_per_block"], "block_twin": r["block_twin"],
                         "plain_stock_days_per_s": match[0]["stock_days_per_s"],
                         "ray_stock_days_per_s": r["stock_days_per_s"],
                         "overhead_fraction": 1.0 - r["stock_days_per_s"] / match[0]["stock_days_per_s"],
                         **_adjacent_overhead(r)})
    return rows


def _adjacent_overhead(ray_row: dict) -> dict:
    """1 - Ray / the mean of the plain runs right before and after it (same setting)."""
    mean = float(np.mean(ray_row["adjacent_plain_stock_days_per_s"]))
    return {"adjacent_plain_mean_stock_days_per_s": mean,
            "overhead_vs_adjacent_fraction": 1.0 - ray_row["stock_days_per_s"] / mean}


def print_table(plain: list, ray_results: list, overhead: list) -> None:
    print(f"\n{'run':50s} {'stock-days/s':>13s} {'per core':>9s} {'data wait':>9s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for row in plain + ray_results:
        label = (f"plain threads={row['threads']}" if row["kind"] == "plain" else f"ray workers={row['workers']}")
        label += f" {row['precision']} D={row['batch_days']}" + _variant_label(row)
        print(f"{label:50s} {row['stock_days_per_s']:13,.0f} {row['stock_days_per_s_per_core']:9,.0f} "
              f"{100 * row['data_wait_fraction']:8.1f}% {row['gflops']:8.1f} {100 * row['fraction_of_matmul_ceiling']:7.1f}%")
    for row in overhead:
        print(f"Ray overhead, {row['cores']} core(s) {row['precision']} D={row['batch_days']}{_variant_label(row)}: "
              f"{100 * row['overhead_fraction']:.1f}% against the plain rows above, "
              f"{100 * row['overhead_vs_adjacent_fraction']:.1f}% against the plain runs beside it")


def _variant_label(row: dict) -> str:
    """What sets a Ray row apart from the default run ("" for the default and plain rows)."""
    label = "" if row.get("feeder", True) else " no feeder"
    if row.get("ab_twin"):
        label += " gloo all-reduce" if row.get("allreduce") == "process_group" else " shm all-reduce"
    if row.get("pin_twin"):
        label += " pinned" if row.get("pinned") else " not pinned"
    if row.get("block_twin"):
        label += f" {row['days_per_block']} days/block"
    return label


if __name__ == "__main__":
    main()
