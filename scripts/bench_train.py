"""Training throughput: the model step alone, and one epoch end to end on Ray Train.

    python scripts/bench_train.py --dataset data/cn_all [--dataset data/csi300 ...] [--out bench/train.json]
                                  [--sections step,allocator,epoch] [--quick] [--variants w2-fp32-auto,...]
                                  [--storage DIR]

models     every model of the reproduction grid (FactorVAE, its variants, each baseline): its training
           step on the same real days, one thread, as a multiple of FactorVAE's (what each row of
           Table 1 costs; not in the default sections)
step       FactorVAE's training step in one process, one thread, fp32, on real days of each data set
           (and on its largest day): ms per step (median of interleaved rounds) and the thread's CPU
           time, with the CPU fast paths off and with the GRU path on (train.cpu_kernels)
allocator  the same step in a thread of a fresh process (where Ray Train runs it), 1 and 4 days a
           step, with and without the allocator path: page faults, ms and the thread's CPU ms per step
epoch      `fvae-dist train` for one epoch (a fresh local cluster each, as a user runs it) with 1 and
           2 workers, fp32 and bf16, fast paths on (auto) and, fp32, off (and, 2 workers, the GRU path
           alone, which isolates the allocator path's share): wall time end to end, the
           epoch's seconds, stock-days/s (and per core), data wait, peak RSS of the driver, of every
           training worker and of its input actor (the kernel's VmHWM of each process), their CPU
           seconds (what compares fast paths on a shared machine) and the mean load average
Compare as ratios inside one run: the machine is shared and its speed drifts. Results go to the
JSON file and a Markdown table on stdout (docs/benchmarks.md holds the dated figures).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fvae_dist.config import write_text_atomic  # noqa: E402

CORES = os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# step and allocator: one process, no Ray
# ----------------------------------------------------------------------------------------------

def sample_days(dataset: Path, count: int) -> list:
    """`count` training days spread over the split's shards, plus the split's largest day."""
    from fvae_dist.data.shards import iter_shard_days, load_manifest, shard_entries

    manifest = load_manifest(dataset)
    entries = shard_entries(manifest, "train")
    per_shard = -(-count // len(entries))
    days = []
    for entry in entries:
        days += list(itertools.islice(iter_shard_days(dataset, entry, drop_nan_label=True, manifest=manifest), per_shard))
    largest = max((d for d in iter_shard_days(dataset, entries[-1], drop_nan_label=True, manifest=manifest)),
                  key=lambda d: len(d.instruments))
    step = max(1, len(days) // count)
    return days[::step][:count] + [largest]


def step_times(days: list, cpu_kernels: str, rounds: int, model_overrides: tuple[str, ...] = ()) -> list[tuple[float, float]]:
    """(wall ms, thread CPU ms) of one training step, per round (each round: every day once).
    The model is cn_all.yaml's (the grid's base) with `model_overrides` ("model.name=gru", ...)."""
    from fvae_dist import accel
    from fvae_dist.config import load_config
    from fvae_dist.data.shards import collate_days
    from fvae_dist.models.registry import build_model

    torch.manual_seed(0)
    cfg = load_config(REPO / "tune_configs" / "cn_all.yaml",
                      [f"model.num_features={days[0].x.shape[-1]}", *model_overrides])
    model = accel.prepare_model(build_model(cfg.model).train(), cpu_kernels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches = [{k: torch.from_numpy(v) for k, v in collate_days([day]).items()} for day in days]

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        model(batch["x"], batch["mask"], batch["y"])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()

    for batch in batches[:2]:
        step(batch)
    out = []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.thread_time()
        for batch in batches:
            step(batch)
        out.append(((time.perf_counter() - wall) * 1e3 / len(batches), (time.thread_time() - cpu) * 1e3 / len(batches)))
    return out


def bench_step(dataset: Path, quick: bool) -> list[dict]:
    torch.set_num_threads(1)
    days = sample_days(dataset, 4 if quick else 12)
    groups = {"typical": days[:-1], "largest day": days[-1:]}
    rows = []
    for label, group in groups.items():
        per = {setting: [] for setting in ("off", "gru")}
        for _ in range(2 if quick else 3):  # interleaved: drift hits both alike
            for setting in per:
                per[setting] += step_times(group, setting, rounds=1 if label == "largest day" else 2)
        row = {"dataset": str(dataset), "days": label, "stocks": round(statistics.mean(len(d.instruments) for d in group))}
        for setting, times in per.items():
            row[f"{setting}_ms"] = statistics.median(t[0] for t in times)
            row[f"{setting}_cpu_ms"] = statistics.median(t[1] for t in times)
        row["gru_gain"] = row["off_ms"] / row["gru_ms"] - 1
        row["gru_cpu_gain"] = row["off_cpu_ms"] / row["gru_cpu_ms"] - 1
        row["stock_days_per_s_off"] = row["stocks"] / row["off_ms"] * 1e3
        rows.append(row)
        print(f"step {dataset.name} {label} ({row['stocks']} stocks): off {row['off_ms']:.1f} ms, gru "
              f"{row['gru_ms']:.1f} ms ({100 * row['gru_gain']:+.1f}%, CPU {100 * row['gru_cpu_gain']:+.1f}%)", flush=True)
    return rows


# Table 1's rows as the grid trains them (tune_configs/reproduce_paper.yaml: base cn_all.yaml, the
# variant or model.name of each key)
GRID_MODELS = {"factorvae": (), "prior": ("model.variant=prior",), "port": ("model.variant=port",),
               "linear": ("model.name=linear",), "ca": ("model.name=ca",), "gru": ("model.name=gru",),
               "alstm": ("model.name=alstm",), "gat": ("model.name=gat",), "trans": ("model.name=trans",),
               "sfm": ("model.name=sfm",)}


def bench_models(dataset: Path, quick: bool) -> list[dict]:
    """Every model of the reproduction grid: its training step on the same typical days, one thread,
    fast paths on (auto), as a multiple of FactorVAE's; what a row of Table 1 costs next to another."""
    torch.set_num_threads(1)
    days = sample_days(dataset, 4 if quick else 8)[:-1]
    stocks = round(statistics.mean(len(d.instruments) for d in days))
    # fast paths on (auto), and SFM once more without its compiled loop, to show that path's share
    settings = {name: (overrides, "auto") for name, overrides in GRID_MODELS.items()}
    settings["sfm, compile off"] = (GRID_MODELS["sfm"], "gru,allocator")
    per = {name: [] for name in settings}
    for _ in range(1 if quick else 2):  # interleaved: drift hits every model alike
        for name, (overrides, cpu_kernels) in settings.items():
            per[name] += step_times(days, cpu_kernels, rounds=1, model_overrides=overrides)
    reference = statistics.median(t[1] for t in per["factorvae"])
    rows = []
    for name, times in per.items():
        cpu_ms = statistics.median(t[1] for t in times)
        rows.append({"dataset": str(dataset), "model": name, "stocks": stocks, "days": len(days),
                     "ms": statistics.median(t[0] for t in times), "cpu_ms": cpu_ms,
                     "cpu_vs_factorvae": cpu_ms / reference})
        print(f"models {dataset.name} {name}: {cpu_ms:.0f} ms CPU a step ({stocks} stocks), "
              f"{cpu_ms / reference:.2f}x FactorVAE", flush=True)
    return rows


ALLOCATOR_PROBE = r"""
import json, sys, threading, time, torch
sys.path.insert(0, sys.argv[1])
from fvae_dist import accel
from fvae_dist.data.shards import collate_days
from fvae_dist.models.factorvae import FactorVAE, FactorVAEConfig
from fvae_dist.train.thread_stats import minor_faults_this_thread
sys.path.insert(0, sys.argv[1] + "/scripts")
from bench_train import sample_days
setting = sys.argv[3]
torch.set_num_threads(1)
accel.prepare_worker_process(setting)
days = sample_days(__import__("pathlib").Path(sys.argv[2]), 8)[:8]
model = FactorVAE(FactorVAEConfig(num_features=days[0].x.shape[-1], gamma=0.01)).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
result = {}
def steps():
    def step(b):
        optimizer.zero_grad(set_to_none=True); model(b["x"], b["mask"], b["y"])["loss"].backward(); optimizer.step()
    for per_step in (1, 4):  # the presets' one day a step, and several
        batches = [{k: torch.from_numpy(v) for k, v in collate_days(days[i:i + per_step]).items()}
                   for i in range(0, 8, per_step)]
        rounds = batches * (8 // len(batches))  # 8 steps
        for b in rounds: step(b)
        faults, wall, cpu = minor_faults_this_thread(), time.perf_counter(), time.thread_time()
        for b in rounds: step(b)
        result[per_step] = {"faults_per_step": (minor_faults_this_thread() - faults) / 8,
                            "ms_per_step": (time.perf_counter() - wall) * 1e3 / 8,
                            "cpu_ms_per_step": (time.thread_time() - cpu) * 1e3 / 8}  # the thread's own CPU
thread = threading.Thread(target=steps); thread.start(); thread.join()
print(json.dumps(result))
"""


def bench_allocator(dataset: Path, quick: bool) -> list[dict]:
    from fvae_dist import accel

    rows = []
    for attempt, setting in itertools.product(range(1 if quick else 3), ("off", "allocator")):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        env.update(accel.worker_env_vars(setting))
        done = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, str(REPO), str(dataset), setting], env=env,
                              capture_output=True, text=True, timeout=1800, check=True)
        for per_step, measured in json.loads(done.stdout.strip().splitlines()[-1]).items():
            row = {"dataset": str(dataset), "setting": setting, "attempt": attempt, "days_per_step": int(per_step),
                   **measured}
            rows.append(row)
            print(f"allocator {dataset.name} {setting} {per_step} day(s) a step: {row['ms_per_step']:.0f} ms "
                  f"(CPU {row['cpu_ms_per_step']:.0f} ms), {row['faults_per_step']:.0f} faults a step", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# epoch: `fvae-dist train` end to end
# ----------------------------------------------------------------------------------------------

def variant_name(variant: dict) -> str:
    return f"w{variant['workers']}-{variant['precision']}-{variant['cpu_kernels']}"


def epoch_variants(quick: bool, only: str | None = None) -> list[dict]:
    """The configurations, in the order they run; `only`: a comma-separated list of names such as
    w2-fp32-auto,w2-fp32-off (that order)."""
    if only:
        known = {variant_name(v): v for v in epoch_variants(False)}
        unknown = [name for name in only.split(",") if name not in known]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(known)}")
        return [known[name] for name in only.split(",")]
    # fast paths on and off side by side (the machine's speed drifts), fp32 before bf16; "gru"
    # (every path but the allocator's) isolates the allocator path's share of the end-to-end step
    variants = [dict(workers=2, precision="fp32", cpu_kernels=k) for k in ("auto", "off", "gru")]
    variants += [dict(workers=1, precision="fp32", cpu_kernels=k) for k in ("auto", "off")]
    variants += [dict(workers=w, precision="bf16", cpu_kernels="auto") for w in (2, 1)]
    return variants[:2] if quick else variants


class RunStats:
    """What the kernel says about every Ray process a command starts, sampled every `every`
    seconds while it runs: each process's peak resident memory (/proc/<pid>/status VmHWM, which
    only grows) and CPU seconds (utime + stime), by role; and the machine's load average.

    CPU seconds compare fast paths on a shared machine where wall time does not: a neighbour's
    load stretches the wall time of a run, much less the CPU time its own processes need.
    A local cluster's processes are descendants of the driver, so the other Ray clusters on a
    shared machine do not count. Roles are the process titles Ray gives its workers:
    RayTrainWorker (a training rank), BatchFeeder (the rank's input actor), and the rest; and
    "driver", the fvae-dist command itself."""

    TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int, every: float = 2.0):
        import threading

        self._pid, self._every = pid, every
        self.seen: dict[int, list] = {}  # pid -> [role, peak MB, CPU s]
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self._every):
            self.loads.append(os.getloadavg()[0])
            try:
                children = psutil.Process(self._pid).children(recursive=True)
            except psutil.Error:
                return
            for child in children:
                try:
                    title = " ".join(child.cmdline())
                    status = Path(f"/proc/{child.pid}/status").read_text()
                    stat = Path(f"/proc/{child.pid}/stat").read_text()
                except (psutil.Error, OSError):
                    continue
                if "fvae_dist.cli" in title:
                    role = "driver"  # the fvae-dist command itself
                elif title.startswith("ray::"):
                    role = title.split()[0].removeprefix("ray::").split(".")[0]
                else:
                    continue
                hwm = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)
                fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
                cpu = (int(fields[11]) + int(fields[12])) / self.TICKS  # utime, stime
                old_role, old_hwm, _ = self.seen.get(child.pid, (role, 0.0, 0.0))
                # a worker's title changes with the task it runs; a training rank stays one
                keep = old_role if old_role in ("RayTrainWorker", "BatchFeeder") else role
                self.seen[child.pid] = [keep, max(old_hwm, hwm), cpu]

    def stop(self) -> dict:
        """{"peak_rss_mb": {role: [MB per process, largest first]}, "cpu_s": {role: total},
        "load_average_mean": ...}"""
        self._stop.set()
        self._thread.join()
        peaks: dict[str, list[float]] = {}
        cpu: dict[str, float] = {}
        for role, mb, seconds in self.seen.values():
            peaks.setdefault(role, []).append(round(mb, 1))
            cpu[role] = round(cpu.get(role, 0.0) + seconds, 1)
        return {"peak_rss_mb": {role: sorted(v, reverse=True) for role, v in sorted(peaks.items())},
                "cpu_s": dict(sorted(cpu.items())),
                "load_average_mean": round(statistics.mean(self.loads), 1) if self.loads else None}


def bench_epoch(dataset: Path, quick: bool, storage: Path, record, only: str | None = None) -> list[dict]:
    """One `fvae-dist train` epoch per variant; `record(rows)` after each, so a long run that is
    stopped keeps what it measured. A failed variant is recorded with its error, not fatal."""
    rows = []
    for variant in epoch_variants(quick, only):
        cpus = round((CORES - 1) / variant["workers"] - 0.05, 2)  # Ray Data keeps a CPU
        name = f"{dataset.name}-{variant_name(variant)}-{int(time.time())}"
        overrides = ["--config", str(REPO / "tune_configs" / "cn_all.yaml"), f"data.dataset_dir={dataset}",
                     "data.test_split=none", "train.epochs=1", "train.early_stopping_patience=0",
                     f"train.precision={variant['precision']}", f"train.cpu_kernels={variant['cpu_kernels']}",
                     f"ray.num_workers={variant['workers']}", f"ray.cpus_per_worker={cpus}",
                     f"train.torch_threads={max(1, int(cpus + 0.5))}",
                     f"ray.storage_path={storage}", f"ray.run_name={name}"]
        started = time.perf_counter()
        log = storage / f"{name}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "fvae_dist.cli", "train",
                                        *overrides], cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True)
            sampler = RunStats(process.pid)
            try:
                returncode = process.wait(timeout=7200)
            finally:
                if process.poll() is None:
                    process.kill()
                stats = sampler.stop()
        wall = time.perf_counter() - started
        text = log.read_text()
        row = {"dataset": str(dataset), **variant, "cpus_per_worker": cpus, "wall_s": wall,
               "load_average_mean": stats["load_average_mean"]}
        if returncode != 0:
            row["error"] = text[-3000:]
            rows.append(row)
            record(rows)
            print(f"epoch {dataset.name} {variant}: FAILED after {wall:.0f} s (log tail in the JSON)", flush=True)
            continue
        history = json.loads((storage / name / "metrics.json").read_text())["history"][0]
        rate = history["perf_stock_days_per_s"]
        row.update({
            "epoch_s": history["perf_epoch_seconds"], "stock_days_per_s": rate, "per_core": rate / CORES,
            "data_wait": history["perf_data_wait_fraction"],
            "rank0_peak_rss_mb": history.get("perf_peak_rss_mb"),  # what the run itself reports
            "worker_peak_rss_mb": stats["peak_rss_mb"].get("RayTrainWorker", []),  # every rank, from the kernel
            "feeder_peak_rss_mb": stats["peak_rss_mb"].get("BatchFeeder", []),
            "ray_processes_peak_rss_mb": stats["peak_rss_mb"],
            # the whole run's CPU seconds of the training ranks (epoch, validation, scoring) and
            # of their input actors
            "worker_cpu_s": stats["cpu_s"].get("RayTrainWorker"), "feeder_cpu_s": stats["cpu_s"].get("BatchFeeder"),
            "ray_processes_cpu_s": stats["cpu_s"],
            "driver_peak_rss_mb": max(stats["peak_rss_mb"].get("driver", []), default=None),
            # /usr/bin/time's figure: the largest of the driver and the descendants it reaped
            "tree_max_rss_mb": int(text.strip().splitlines()[-1]) / 1024,
            "valid_rank_ic": history["valid_rank_ic"]})
        rows.append(row)
        record(rows)
        print(f"epoch {dataset.name} {variant}: {wall:.0f} s end to end, epoch {row['epoch_s']:.0f} s, "
              f"{rate:,.0f} stock-days/s, data wait {100 * row['data_wait']:.1f}%, worker peak RSS "
              f"{row['worker_peak_rss_mb']} MB, worker CPU {row['worker_cpu_s']} s, load {row['load_average_mean']}",
              flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = []
    if results.get("epoch"):
        lines += ["| data set | workers | precision | fast paths | end to end | epoch | stock-days/s | per core | "
                  "data wait | worker RSS | driver RSS |", "|" + "---|" * 11]
        for r in results["epoch"]:
            if "error" in r:
                lines.append(f"| {Path(r['dataset']).name} | {r['workers']} | {r['precision']} | {r['cpu_kernels']} | failed |")
                continue
            worker_rss = max(r["worker_peak_rss_mb"], default=float("nan"))
            lines.append(f"| {Path(r['dataset']).name} | {r['workers']} | {r['precision']} | {r['cpu_kernels']} | "
                         f"{r['wall_s']:.0f} s | {r['epoch_s']:.0f} s | {r['stock_days_per_s']:,.0f} | {r['per_core']:,.0f} | "
                         f"{100 * r['data_wait']:.1f}% | {worker_rss:.0f} MB | "
                         f"{r['driver_peak_rss_mb'] or float('nan'):.0f} MB |")
    return "\n".join(lines)


def git_commit() -> str | None:
    """HEAD of this checkout, "+dirty" when it has uncommitted changes: figures are tied to it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def save(out: str, results: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, help="prepared data set (repeatable)")
    parser.add_argument("--out", default=str(REPO / "bench" / "train.json"))
    parser.add_argument("--sections", default="step,allocator,epoch")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and variants (a smoke test)")
    parser.add_argument("--variants", default=None,
                        help="epoch: only these configurations, in this order (e.g. w2-fp32-auto,w2-fp32-off)")
    parser.add_argument("--storage", default=None,
                        help="where the epoch runs' folders and logs go (default: a temporary folder, removed)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cores": CORES,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
               "commit": git_commit(), "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        storage = Path(args.storage).resolve() if args.storage else Path(scratch)
        storage.mkdir(parents=True, exist_ok=True)
        for dataset in map(Path, args.dataset):
            if "step" in sections:
                results.setdefault("step", []).extend(bench_step(dataset, args.quick))
            if "models" in sections:
                results.setdefault("models", []).extend(bench_models(dataset, args.quick))
            if "allocator" in sections:
                results.setdefault("allocator", []).extend(bench_allocator(dataset, args.quick))
            if "epoch" in sections:
                done = list(results.get("epoch", []))

                def record(rows, done=done):
                    results["epoch"] = done + rows
                    save(args.out, results)

                bench_epoch(dataset, args.quick, storage, record, args.variants)
            save(args.out, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
