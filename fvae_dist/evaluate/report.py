"""The paper's tables and figures from run folders: report.md, report.json and PNG plots.

A run folder (written by training) holds config.yaml (with `model.name` or `name`, and `seed`;
registry names print as the paper's labels: FactorVAE by its variant, "GRU", "Trans", ...),
metrics.json, predictions/<split>.parquet (date, instrument, mu, sigma, label) and
manifest_hash.txt; optionally backtest/<strategy>_{daily.csv,summary.json} from `fvae-dist backtest`.
Runs are grouped by model name; "mean (std)" is over the group's runs (seeds), std with ddof=1.

Table 1: Rank IC and Rank ICIR per model (from the predictions; metrics.json when they are absent).
Table 2: robustness, from a robustness/results.csv (model, m, seed, rank_ic, rank_icir).
Table 3: AR, SR (information ratio) and MDD of the excess return over the benchmark, without and
with costs, for TopK-Drop and, where the model predicts sigma, TDrisk (a note names the runs
without one, e.g. the point-forecast baselines, whose sigma is NaN); Qlib's summed convention
and a compounded variant. Backtests found in the run folders are used; otherwise they are run
here when bars and a benchmark are given (and written under <out>/backtests/), else the table is
left out with a note.
Figures: portfolio.png (the paper's Figure 6: cumulative excess and absolute return per model
and the benchmark), rank_ic.png (daily Rank IC and its rolling mean), calibration.png (realised
RMS error of mu against predicted sigma, stocks binned by sigma; the label is compared raw or
CSRankNorm'd per day, whichever matches the scale of sigma unless told).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from fvae_dist.data.processors import cs_rank_norm
from fvae_dist.errors import ConfigError, DataError
from fvae_dist.evaluate.backtest import (
    STRATEGIES,
    BacktestConfig,
    BacktestResult,
    bars_window,
    load_bars,
    load_benchmark,
    read_result,
    run_backtest,
    write_result,
)
from fvae_dist.evaluate.metrics import daily_ic, read_predictions, realised_label, require_columns, summarize_ic
from fvae_dist.models.registry import model_label

STRATEGY_SUFFIX = {"topk_drop": "", "tdrisk": " (TDrisk)"}
ROBUSTNESS_COLUMNS = ["model", "m", "seed", "rank_ic", "rank_icir"]


@dataclass
class RunRecord:
    path: Path
    model: str
    seed: int | None
    manifest_hash: str | None
    metrics: dict
    predictions_path: Path | None
    predictions: pd.DataFrame | None
    backtests: dict = field(default_factory=dict)  # strategy -> BacktestResult
    backtest_source: dict = field(default_factory=dict)  # strategy -> where it came from
    signal: dict | None = None  # summarize_ic output + "source"
    daily_ic: pd.DataFrame | None = None

    @property
    def label(self) -> str:
        return f"{self.model} (seed {self.seed})" if self.seed is not None else self.model


# ----------------------------------------------------------------------------- run folders


def find_run_dirs(dirs) -> list[Path]:
    """Each DIR that holds a config.yaml, or else its direct sub-folders that do."""
    found: list[Path] = []
    for given in map(Path, dirs):
        if (given / "config.yaml").is_file():
            found.append(given)
            continue
        children = sorted(p for p in given.iterdir() if (p / "config.yaml").is_file()) if given.is_dir() else []
        if not children:
            raise DataError(f"{given}: not a run folder (no config.yaml) and no sub-folder is one")
        found.extend(children)
    return found


def _model_and_seed(config: dict, path: Path) -> tuple[str, int | None]:
    model = config.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    name = name or config.get("name")
    variant = model.get("variant") if isinstance(model, dict) else None
    if not name and variant:
        name = "factorvae"  # a training config from before model.name existed
    if name:
        # as the paper's tables do: FactorVAE by its variant, baselines as "GRU", "Trans", ...
        name = model_label(name, variant)
    if not name:
        raise DataError(f"{path}: no `model.name`, `model.variant` or `name` in config.yaml")
    seed = config.get("seed")
    if seed is None and isinstance(config.get("train"), dict):
        seed = config["train"].get("seed")
    return str(name), (int(seed) if seed is not None else None)


def load_run(path, split: str = "test") -> RunRecord:
    path = Path(path)
    config_path = path / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{config_path}: unreadable config: {exc}") from exc
    model, seed = _model_and_seed(config, config_path)
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    hash_path = path / "manifest_hash.txt"
    manifest = hash_path.read_text().strip() if hash_path.is_file() else None
    predictions_path = path / "predictions" / f"{split}.parquet"
    predictions = read_predictions(predictions_path) if predictions_path.is_file() else None
    record = RunRecord(path, model, seed, manifest, metrics, predictions_path if predictions is not None else None, predictions)
    for strategy in STRATEGIES:
        result = read_result(path / "backtest", strategy)
        if result is not None:
            record.backtests[strategy] = result
            record.backtest_source[strategy] = str(path / "backtest")
    return record


def _metric_from_json(metrics: dict, split: str, key: str) -> float | None:
    """rank_ic / rank_icir from metrics.json, flat or under the split; "Rank IC" spelling accepted."""
    for scope in (metrics.get(split), metrics):
        if isinstance(scope, dict):
            for name, value in scope.items():
                if str(name).lower().replace(" ", "_") == key and isinstance(value, (int, float)):
                    return float(value)
    return None


def attach_signal_metrics(run: RunRecord, split: str) -> None:
    if run.predictions is not None and "label" in run.predictions.columns:
        run.daily_ic = daily_ic(run.predictions, score="mu", label="label")
        run.signal = {**summarize_ic(run.daily_ic), "source": str(run.predictions_path)}
        return
    rank_ic = _metric_from_json(run.metrics, split, "rank_ic")
    rank_icir = _metric_from_json(run.metrics, split, "rank_icir")
    if rank_ic is not None:
        run.signal = {"rank_ic": rank_ic, "rank_icir": rank_icir if rank_icir is not None else math.nan, "source": "metrics.json"}


def _no_risk_estimate(run: RunRecord) -> bool:
    """A run whose predictions carry no sigma at all (a point-forecast baseline: all NaN)."""
    if run.predictions is None:
        return False
    if "sigma" not in run.predictions.columns:
        return True
    return bool(pd.to_numeric(run.predictions["sigma"], errors="coerce").isna().all())


def _no_sigma_note(runs: list[RunRecord], what: str) -> list[str]:
    """A note line naming the runs skipped for `what` because they predict no sigma."""
    skipped = [r for r in runs if _no_risk_estimate(r)]
    if not skipped:
        return []
    names = ", ".join(f"{r.label} ({r.path})" for r in skipped)
    return [f"_{what} skipped for runs without a risk estimate (sigma is NaN; point-forecast baselines): {names}._", ""]


def _usable_sigma(predictions: pd.DataFrame) -> bool:
    if "sigma" not in predictions.columns:
        return False
    sigma = pd.to_numeric(predictions["sigma"], errors="coerce")
    return bool(np.isfinite(sigma).all() and (sigma > 0).all() and sigma.nunique() > 1)


# ----------------------------------------------------------------------------- formatting


def mean_std(values) -> tuple[float, float, int]:
    v = pd.Series([x for x in values if x is not None], dtype="float64").dropna()
    if v.empty:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def fmt_mean_std(values, digits: int = 3, percent: bool = False) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    text = f"{mean * scale:.{digits}f}{suffix}"
    return f"{text} ({std * scale:.{digits}f}{suffix})" if n > 1 else text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _models_in_order(runs: list[RunRecord]) -> list[str]:
    return list(dict.fromkeys(run.model for run in runs))


# ----------------------------------------------------------------------------- tables


def table1(runs: list[RunRecord]) -> tuple[str, dict]:
    rows, numbers = [], {}
    for model in _models_in_order(runs):
        group = [r for r in runs if r.model == model and r.signal is not None]
        rank_ic = [r.signal["rank_ic"] for r in group]
        rank_icir = [r.signal["rank_icir"] for r in group]
        rows.append([model, fmt_mean_std(rank_ic), fmt_mean_std(rank_icir), str(len(group))])
        numbers[model] = {"rank_ic": mean_std(rank_ic), "rank_icir": mean_std(rank_icir), "seeds": [r.seed for r in group]}
    return markdown_table(["Method", "Rank IC", "Rank ICIR", "runs"], rows), numbers


def table2(results: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The paper's Table 2 from robustness results (model, m, seed, rank_ic, rank_icir[, status]):
    a row per model, Rank IC and Rank ICIR per m as mean (std) over the seeds that finished.
    With a status column (the robustness job's results.csv) only "ok" runs count and a cell
    with failed or unfinished runs says how many. Returns the markdown and a row per (model, m)."""
    require_columns(results, ROBUSTNESS_COLUMNS, "robustness results.csv")
    status = results["status"] if "status" in results.columns else pd.Series("ok", index=results.index)
    ms = sorted(int(m) for m in results["m"].unique())
    header = ["Methods"] + [f"m={m} {name}" for m in ms for name in ("Rank IC", "Rank ICIR")]
    rows, numbers = [], []
    for model in dict.fromkeys(results["model"]):
        row = [str(model)]
        for m in ms:
            in_cell = (results["model"] == model) & (results["m"] == m)
            ok = results[in_cell & (status == "ok")]
            n_cell = int(in_cell.sum())
            n_failed = int((in_cell & (status == "failed")).sum())
            n_pending = n_cell - len(ok) - n_failed
            note = "".join([f" [{n_failed} of {n_cell} failed]" if n_failed else "",
                            f" [{n_pending} of {n_cell} pending]" if n_pending else ""])
            row += [fmt_mean_std(ok["rank_ic"]) + note, fmt_mean_std(ok["rank_icir"]) + note]
            ic_mean, ic_std, _ = mean_std(ok["rank_ic"])
            ir_mean, ir_std, _ = mean_std(ok["rank_icir"])
            numbers.append({"model": model, "m": m, "rank_ic_mean": ic_mean, "rank_ic_std": ic_std,
                            "rank_icir_mean": ir_mean, "rank_icir_std": ir_std, "runs_ok": len(ok),
                            "runs_failed": n_failed, "runs_pending": n_pending,
                            "seeds_ok": " ".join(str(int(seed)) for seed in sorted(ok["seed"]))})
        rows.append(row)
    return markdown_table(header, rows), pd.DataFrame(numbers)


def table3(runs: list[RunRecord], mode: str) -> tuple[str, dict]:
    header = ["Method"] + [
        f"{name} {cost}" for cost in ("w/o cost", "with cost") for name in ("AR (↑)", "SR (↑)", "MDD (↓)")
    ]
    rows, numbers = [], {}
    for model in _models_in_order(runs):
        for strategy in STRATEGIES:
            group = [r.backtests[strategy].summary for r in runs if r.model == model and strategy in r.backtests]
            if not group:
                continue
            row, entry = [model + STRATEGY_SUFFIX[strategy]], {}
            for key in ("excess_return_without_cost", "excess_return_with_cost"):
                ar = [s[key][mode]["annualized_return"] for s in group]
                sr = [s[key][mode]["information_ratio"] for s in group]
                # Qlib's max_drawdown is negative; the paper prints its size.
                mdd = [abs(s[key][mode]["max_drawdown"]) for s in group]
                row += [fmt_mean_std(ar, 2, percent=True), fmt_mean_std(sr, 2), fmt_mean_std(mdd, 2, percent=True)]
                entry[key] = {"annualized_return": mean_std(ar), "information_ratio": mean_std(sr), "max_drawdown": mean_std(mdd)}
            entry["runs"] = len(group)
            rows.append(row)
            numbers[row[0]] = entry
    return markdown_table(header, rows), numbers


# ----------------------------------------------------------------------------- figures


def _mean_daily(results: list[BacktestResult], column: str) -> pd.Series:
    """The column averaged over a model's runs, date by date (an average of the seeds' portfolios)."""
    table = pd.concat([r.daily.set_index("date")[column] for r in results], axis=1)
    return table.mean(axis=1).sort_index()


def plot_portfolio(runs: list[RunRecord], path: Path) -> None:
    fig = Figure(figsize=(13, 5), layout="constrained")
    ax_excess, ax_abs = fig.subplots(1, 2)
    bench = None
    for k, model in enumerate(_models_in_order(runs)):
        color = f"C{k % 10}"  # one colour per model; TDrisk is its dashed twin
        for strategy, style in (("topk_drop", "-"), ("tdrisk", "--")):
            results = [r.backtests[strategy] for r in runs if r.model == model and strategy in r.backtests]
            if not results:
                continue
            name = model + STRATEGY_SUFFIX[strategy] + (f" ({len(results)} runs)" if len(results) > 1 else "")
            excess = _mean_daily(results, "excess_with_cost").cumsum()
            absolute = (_mean_daily(results, "return") - _mean_daily(results, "cost")).cumsum()
            ax_excess.plot(excess.index, excess.to_numpy(), style, color=color, lw=1.6, label=name)
            ax_abs.plot(absolute.index, absolute.to_numpy(), style, color=color, lw=1.6, label=name)
            bench_now = _mean_daily(results, "bench")
            if bench is None or len(bench_now) > len(bench):
                bench = bench_now
    if bench is not None:
        ax_abs.plot(bench.index, bench.cumsum().to_numpy(), color="black", lw=2.0, label="benchmark")
    ax_excess.axhline(0.0, color="grey", lw=0.8)
    ax_excess.set_title("(a) cumulative excess return over the benchmark, after costs")
    ax_abs.set_title("(b) cumulative return, after costs")
    for ax in (ax_excess, ax_abs):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel("sum of daily returns")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        for tick in ax.get_xticklabels():
            tick.set_rotation(30)
    fig.savefig(path, dpi=110)


def plot_rank_ic(runs: list[RunRecord], window: int, path: Path) -> None:
    models = [m for m in _models_in_order(runs) if any(r.model == m and r.daily_ic is not None for r in runs)]
    fig = Figure(figsize=(12, 2.6 * len(models) + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(models), 1, sharex=True, squeeze=False)[:, 0])
    for ax, model in zip(axes, models):
        tables = [r.daily_ic.set_index("date")["rank_ic"] for r in runs if r.model == model and r.daily_ic is not None]
        daily = pd.concat(tables, axis=1).mean(axis=1).sort_index()
        rolling = daily.rolling(window, min_periods=max(1, window // 2)).mean()
        # the title quotes Table 1's numbers (mean over runs of each run's own summary)
        summaries = [r.signal for r in runs if r.model == model and r.daily_ic is not None]
        mean = float(np.mean([s["rank_ic"] for s in summaries]))
        ratio = float(np.mean([s["rank_icir"] for s in summaries]))
        ax.bar(daily.index, daily.to_numpy(), width=1.0, color="tab:blue", alpha=0.35, label="daily Rank IC")
        ax.plot(rolling.index, rolling.to_numpy(), color="tab:red", lw=2.0, label=f"{window}-day rolling mean")
        ax.axhline(mean, color="black", ls="--", lw=1.0, label=f"mean {mean:.3f}")
        ax.axhline(0.0, color="grey", lw=0.8)
        runs_note = f" (mean over {len(tables)} runs; bars: daily values averaged over the runs)" if len(tables) > 1 else ""
        ax.set_title(f"{model}: Rank IC {mean:.3f}, Rank ICIR {ratio:.3f}{runs_note}", fontsize=10)
        ax.set_ylabel("Rank IC")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", ncol=3)
    fig.savefig(path, dpi=110)


def calibration_bins(frame: pd.DataFrame, target: str, n_bins: int) -> pd.DataFrame:
    """Stocks binned by predicted sigma (quantiles): mean sigma, RMS and mean |target - mu| per bin."""
    used = frame[np.isfinite(frame["sigma"]) & np.isfinite(frame["mu"]) & np.isfinite(frame[target])]
    bins = pd.qcut(used["sigma"], q=n_bins, duplicates="drop")
    error = used[target] - used["mu"]
    grouped = pd.DataFrame({"bin": bins, "sigma": used["sigma"], "sq": error**2, "abs": error.abs()}).groupby("bin", observed=True)
    out = pd.DataFrame(
        {"mean_sigma": grouped["sigma"].mean(), "rms_error": np.sqrt(grouped["sq"].mean()), "mean_abs_error": grouped["abs"].mean(), "n": grouped.size()}
    )
    return out.reset_index(drop=True)


def calibration_units(predictions: pd.DataFrame) -> str:
    """Which label units sigma speaks: 'raw' returns (std of a few %) or 'csranknorm' (std ~1).

    A model trained on the CSRankNorm'd target predicts sigma of order 1; one whose outputs were
    mapped back to returns predicts sigma of order the raw label's spread. The nearer one on a log
    scale wins."""
    sigma = float(np.nanmedian(predictions["sigma"].to_numpy(dtype="float64")))
    raw_spread = float(predictions.groupby("date")["label"].std().median())
    if not (sigma > 0 and raw_spread > 0):
        return "csranknorm"
    return "raw" if abs(math.log(sigma / raw_spread)) < abs(math.log(sigma)) else "csranknorm"


def calibration_target(predictions: pd.DataFrame, kind: str) -> pd.Series:
    """The label in the units of mu: raw, or CSRankNorm'd per day as the training target is."""
    if kind == "raw":
        return predictions["label"].astype("float64")
    day_codes = pd.factorize(predictions["date"])[0]
    return pd.Series(cs_rank_norm(predictions["label"].to_numpy(dtype="float64"), day_codes), index=predictions.index, dtype="float64")


def plot_calibration(runs: list[RunRecord], kind: str, n_bins: int, path: Path) -> dict:
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    numbers, top = {}, 0.0
    names = {"csranknorm": "CSRankNorm'd label", "raw": "raw label"}
    for k, model in enumerate(_models_in_order(runs)):
        usable = [
            r.predictions for r in runs
            if r.model == model and r.predictions is not None and "label" in r.predictions.columns and _usable_sigma(r.predictions)
        ]
        if not usable:
            continue
        units = calibration_units(pd.concat(usable)) if kind == "auto" else kind
        frames = [p.assign(target=calibration_target(p, units)) for p in usable]
        table = calibration_bins(pd.concat(frames, ignore_index=True), "target", n_bins)
        numbers[model] = {"label_units": units, **table.to_dict("list")}
        ax.plot(table["mean_sigma"], table["rms_error"], "o-", color=f"C{k % 10}", lw=1.6, label=f"{model} (y = {names[units]})")
        top = max(top, float(table["mean_sigma"].max()), float(table["rms_error"].max()))
    ax.plot([0, top * 1.05], [0, top * 1.05], "--", color="grey", label="perfect calibration (RMS = sigma)")
    ax.set_xlabel("mean predicted sigma in the bin")
    ax.set_ylabel("realised RMS of (y - mu) in the bin")
    ax.set_title(f"Calibration of sigma: stocks in {n_bins} sigma quantile bins")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=110)
    return numbers


# ----------------------------------------------------------------------------- report


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _run_backtests_here(runs, bars_path, benchmark_path, benchmark_code, config: BacktestConfig, out_dir: Path) -> None:
    """Backtest runs that have predictions but no backtest of their own; bars are read once for all."""
    todo = [r for r in runs if r.predictions is not None and "topk_drop" not in r.backtests]
    if not todo:
        return
    everything = pd.concat([r.predictions[["date", "instrument"]] for r in todo], ignore_index=True)
    start, end = bars_window(everything)
    bars = load_bars(bars_path, everything["instrument"].unique(), start, end)
    benchmark = load_benchmark(benchmark_path, benchmark_code, start, end)
    for run in todo:
        strategies = ["topk_drop"] + (["tdrisk"] if _usable_sigma(run.predictions) else [])
        for strategy in strategies:
            settings = replace(config, strategy=strategy)
            result = run_backtest(run.predictions, bars, benchmark, settings, benchmark_code, source=str(run.predictions_path))
            where = out_dir / "backtests" / f"{run.path.name}"
            write_result(result, where)
            run.backtests[strategy] = result
            run.backtest_source[strategy] = f"computed here -> {where}"


def _fill_missing_labels(runs, bars_path) -> None:
    todo = [r for r in runs if r.predictions is not None and "label" not in r.predictions.columns]
    if not todo or bars_path is None:
        return
    everything = pd.concat([r.predictions[["date", "instrument"]] for r in todo], ignore_index=True)
    start, end = bars_window(everything)
    labels = realised_label(load_bars(bars_path, everything["instrument"].unique(), start, end))
    for run in todo:
        run.predictions = run.predictions.merge(labels, on=["date", "instrument"], how="left")


def _differing_settings(runs: list[RunRecord]) -> str:
    """'key: v1 / v2' for every backtest setting (other than the strategy) that varies across the runs' backtests."""
    configs = [
        {k: v for k, v in result.summary.get("config", {}).items() if k != "strategy"}
        for r in runs for result in r.backtests.values()
    ]
    keys = sorted({k for c in configs for k in c})
    varying = {k: sorted({json.dumps(c.get(k)) for c in configs}) for k in keys}
    return "; ".join(f"{k}: {' / '.join(v)}" for k, v in varying.items() if len(v) > 1)


def _reproducibility(runs, split, bars_path, benchmark_path, benchmark_code, config, command_line) -> str:
    rows = []
    for r in runs:
        if r.predictions is not None:
            p = r.predictions
            preds = f"{r.predictions_path} ({len(p)} rows, {p['date'].min().date()}..{p['date'].max().date()}, sha256 {_file_digest(r.predictions_path)})"
        else:
            preds = f"none (no predictions/{split}.parquet)"
        backtest = "; ".join(f"{s}: {src}" for s, src in r.backtest_source.items()) or "none"
        signal = r.signal["source"] if r.signal else "none"
        rows.append([str(r.path), r.model, str(r.seed), r.manifest_hash or "unknown", preds, signal, backtest])
    lines = [
        "## Inputs (reproducibility)",
        "",
        markdown_table(["run folder", "model", "seed", "data manifest hash", f"predictions ({split})", "Table 1 source", "backtest source"], rows),
        "",
        f"- Bars: {bars_path or 'not given'}; benchmark: {benchmark_path or 'not given'} (code {benchmark_code}).",
        f"- Backtest settings (runs backtested here): `{json.dumps(asdict(config))}`.",
        "- Each run's resolved settings are its config.yaml.",
    ]
    if command_line:
        lines.append(f"- Command: `{command_line}`")
    return "\n".join(lines)


def build_report(
    run_dirs,
    out_dir,
    *,
    split: str = "test",
    bars_path=None,
    benchmark_path=None,
    benchmark_code: str = "SH000300",
    backtest_config: BacktestConfig = BacktestConfig(),
    robustness_csv=None,
    rolling_window: int = 20,
    calibration_label: str = "auto",
    calibration_bins_n: int = 10,
    command_line: str | None = None,
) -> Path:
    """Write <out_dir>/report.md, report.json and the PNG figures; return the report.md path."""
    if calibration_label not in ("auto", "csranknorm", "raw"):
        raise ConfigError(f"calibration label {calibration_label!r}: expected 'auto', 'csranknorm' or 'raw'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_paths = find_run_dirs(run_dirs)
    runs = [load_run(p, split) for p in run_paths]
    _fill_missing_labels(runs, bars_path)
    for run in runs:
        attach_signal_metrics(run, split)

    sections = [f"# FactorVAE report ({split} split, {len(runs)} runs)", ""]
    numbers: dict = {}

    text, numbers["table1"] = table1(runs)
    sections += ["## Table 1: cross-sectional return prediction", "", text, "",
                 "Rank IC = mean of the daily Spearman correlations of mu with the realised label; "
                 "Rank ICIR = mean / std (ddof=1) of the daily values. Cells: mean (std over runs).", ""]

    robustness_files = [Path(p) for p in ([robustness_csv] if robustness_csv else [])]
    robustness_files += [p / "robustness" / "results.csv" for p in map(Path, run_dirs) if (p / "robustness" / "results.csv").is_file()]
    if robustness_files:
        results = pd.concat([pd.read_csv(p) for p in dict.fromkeys(robustness_files)], ignore_index=True)
        text, cells = table2(results)
        numbers["table2"] = cells.to_dict("records")
        sections += ["## Table 2: robustness to stocks unseen in training", "", text, "",
                     f"From {', '.join(map(str, dict.fromkeys(robustness_files)))}.", ""]
    else:
        sections += ["## Table 2: robustness", "", "_Omitted: no robustness/results.csv given or found._", ""]

    if bars_path and benchmark_path:
        _run_backtests_here(runs, bars_path, benchmark_path, benchmark_code, backtest_config, out_dir)
    if any(r.backtests for r in runs):
        text_sum, numbers["table3_sum"] = table3(runs, "sum")
        text_prod, numbers["table3_product"] = table3(runs, "product")
        missing = [str(r.path) for r in runs if not r.backtests]
        sections += ["## Table 3: portfolio performance relative to the benchmark", "", text_sum, "",
                     "Excess return over the benchmark, Qlib's convention: AR = 238 x mean daily excess, "
                     "SR = mean / std x sqrt(238), MDD = largest fall of the summed excess curve. "
                     "TopK-Drop ranks by mu, TDrisk by mu - eta x sigma.", "",
                     "Compounded variant (AR = prod(1 + r)^(238/n) - 1, SR on log returns, MDD on the compounded curve):", "",
                     text_prod, ""]
        if missing:
            sections += [f"_No backtest for: {', '.join(missing)} (give --bars and --benchmark to compute it)._", ""]
        sections += _no_sigma_note(runs, "TDrisk")
        differing = _differing_settings(runs)
        if differing:
            sections += [f"_Warning: the backtests were run with different settings ({differing}); rows may not be comparable._", ""]
        plot_portfolio(runs, out_dir / "portfolio.png")
        sections += ["## Figure: portfolio performance", "", "![portfolio](portfolio.png)", ""]
    else:
        sections += ["## Table 3: portfolio performance", "",
                     "_Omitted: no run has a backtest/ folder and no --bars/--benchmark were given to compute one._", ""]

    if any(r.daily_ic is not None for r in runs):
        plot_rank_ic(runs, rolling_window, out_dir / "rank_ic.png")
        sections += ["## Figure: daily Rank IC", "", "![rank ic](rank_ic.png)", ""]
    if any(r.predictions is not None and "label" in r.predictions.columns and _usable_sigma(r.predictions) for r in runs):
        numbers["calibration"] = plot_calibration(runs, calibration_label, calibration_bins_n, out_dir / "calibration.png")
        sections += ["## Figure: calibration of sigma", "", "![calibration](calibration.png)", "",
                     "Stocks pooled over days and runs, binned by predicted sigma; a calibrated model lies on the diagonal. "
                     "y is the label in the units the model's sigma speaks (the legend says which).", ""]
        sections += _no_sigma_note(runs, "Calibration")
    else:
        sections += ["_Calibration plot omitted: no run has a usable sigma and label._", ""]
        sections += _no_sigma_note(runs, "Calibration")

    sections.append(_reproducibility(runs, split, bars_path, benchmark_path, benchmark_code, backtest_config, command_line))
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(sections) + "\n")
    (out_dir / "report.json").write_text(json.dumps(numbers, indent=2, default=str) + "\n")
    return report_path
