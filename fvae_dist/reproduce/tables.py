"""The paper's Tables 1-3 and Figure 6 from a reproduction's finished runs, into results_dir.

    write_tables(spec, outcome) -> {name: path}

Per finished run (its predictions/valid.parquet and test.parquet), evaluate_run computes once and
caches in <run>/evaluation.json (keyed by the predictions' digests and the backtest settings):
  - Rank IC / ICIR on the whole test span (all A-shares), and on each day's index members;
    the same two on the validation span (for choices between presets, e.g. which universe to
    train on for an index user);
  - TopK-Drop on the members, benchmark the index, with costs, suspensions and price limits;
  - for models with a risk estimate: TDrisk's eta chosen on the VALIDATION predictions
    (evaluate/risk_aversion.py), then TDrisk on the test span with that eta.
Tables average over seeds, mean (std). Seed-ensemble rows (spec.ensembles) score the mean of a
model's seeds' predictions the same way. Written, each atomically:
  table1.md/.csv   Rank IC, Rank ICIR: all A-shares and index members
  table2.md/.csv   robustness (from the robustness job's results), when it ran
  table3.md/.csv   AR, SR (information ratio), MDD of the excess return after costs
  figure6.png      cumulative excess return after costs (mean over seeds) against the index
  validation.md    what was tried on the validation span: every selection candidate, each run's
                   validation Rank IC (all stocks, index members), each run's eta
  reproduce.json   the command, package versions, commit, each run's config hash
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from fvae_dist.config import json_safe, write_text_atomic
from fvae_dist.storage import location
from fvae_dist.data.bars import read_membership
from fvae_dist.evaluate.backtest import BacktestConfig, load_bars, load_benchmark, run_backtest
from fvae_dist.evaluate.ensemble import seed_ensemble
from fvae_dist.evaluate.metrics import daily_ic, read_predictions, summarize_ic
from fvae_dist.evaluate.report import fmt_mean_std, markdown_table, table2
from fvae_dist.evaluate.risk_aversion import choose_eta
from fvae_dist.evaluate.universe import restrict_to_members

EVALUATION_FILE = "evaluation.json"
EVALUATION_SCHEMA = 2  # raised when evaluate_predictions gains a field: older caches are recomputed
PACKAGES = ("torch", "ray", "pyarrow", "pandas", "numpy", "optuna", "deepspeed")


class Market:
    """The prices, index and membership the evaluation reads, loaded once per report."""

    def __init__(self, spec):
        self.spec = spec
        self.membership = read_membership(spec.membership)
        self._bars = None
        self._benchmark = None

    def bars(self) -> pd.DataFrame:
        if self._bars is None:
            members = sorted(self.membership["instrument"].unique())
            self._bars = load_bars(self.spec.bars, instruments=members)
        return self._bars

    def benchmark(self) -> pd.DataFrame:
        if self._benchmark is None:
            self._benchmark = load_benchmark(self.spec.benchmark, self.spec.backtest.benchmark_code)
        return self._benchmark


def _digest(path: Path) -> str:
    return hashlib.sha256(location(path).read_bytes()).hexdigest()[:16]


def backtest_config(spec) -> BacktestConfig:
    return BacktestConfig(topk=spec.backtest.topk, n_drop=spec.backtest.n_drop)


def evaluate_predictions(valid: pd.DataFrame, test: pd.DataFrame, market: Market) -> dict:
    """Signal and portfolio metrics of one set of predictions (a run, or a seed ensemble)."""
    spec = market.spec
    valid_members = restrict_to_members(valid, market.membership)
    test_members = restrict_to_members(test, market.membership)
    result = {"all": summarize_ic(daily_ic(test)),
              "members": summarize_ic(daily_ic(test_members)),
              # the validation span scored the same two ways: what a choice between presets (all-A
              # training against index-only training, for an index user) may look at
              "valid": {"all": summarize_ic(daily_ic(valid)), "members": summarize_ic(daily_ic(valid_members))}}
    config = backtest_config(spec)
    topk = run_backtest(test_members, market.bars(), market.benchmark(), config, spec.backtest.benchmark_code)
    result["topk_drop"] = _portfolio(topk)
    has_risk = all("sigma" in frame.columns and bool(np.isfinite(frame["sigma"]).all()) for frame in (valid, test))
    if has_risk:  # FactorVAE and its variants; the point-forecast baselines' sigma is NaN
        choice = choose_eta(valid_members, market.bars(), market.benchmark(),
                            spec.backtest.etas, config, spec.backtest.benchmark_code)
        tdrisk = run_backtest(test_members, market.bars(), market.benchmark(),
                              replace(config, strategy="tdrisk", eta=choice.eta),
                              spec.backtest.benchmark_code)
        result["tdrisk"] = {**_portfolio(tdrisk), "eta": choice.eta, "valid_information_ratio": choice.criterion,
                            "eta_candidates": choice.candidates.to_dict("records")}
    return result


def _portfolio(backtest) -> dict:
    excess = backtest.summary["excess_return_with_cost"]["sum"]
    daily = backtest.daily
    return {"annualized_return": excess["annualized_return"], "information_ratio": excess["information_ratio"],
            "max_drawdown": excess["max_drawdown"],
            "daily_excess": dict(zip(pd.to_datetime(daily["date"]).dt.strftime("%Y-%m-%d"),
                                     daily["excess_with_cost"].astype(float)))}


def evaluate_run(run_dir: Path, market: Market) -> dict:
    """evaluate_predictions for a finished run, cached in <run>/evaluation.json."""
    run_dir = location(run_dir)  # a path or a storage URI
    valid_path, test_path = run_dir / "predictions" / "valid.parquet", run_dir / "predictions" / "test.parquet"
    key = {"schema": EVALUATION_SCHEMA, "valid": _digest(valid_path), "test": _digest(test_path),
           "backtest": asdict(backtest_config(market.spec)),
           "etas": list(market.spec.backtest.etas), "membership": _digest(market.spec.membership)}
    cache = run_dir / EVALUATION_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["result"]
    result = evaluate_predictions(read_predictions(valid_path), read_predictions(test_path), market)
    write_text_atomic(cache, json.dumps(json_safe({"key": key, "result": result})))
    return result


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def _label(spec, key: str) -> str:
    from fvae_dist.robustness import MODELS

    return MODELS[key].label


def _rows(spec, outcome, market, log) -> list[dict]:
    """One entry per model (and ensemble): its runs' evaluations."""
    entries = []
    for row in spec.models:
        progress = outcome.models.get(row.key)
        runs = sorted((progress.runs if progress else {}).items())
        evaluations = [evaluate_run(location(path), market) for _, path in runs]
        entries.append({"key": row.key, "label": _label(spec, row.key), "evaluations": evaluations,
                        "seeds": row.seeds, "runs": [name for name, _ in runs]})
        if row.key in spec.ensembles and len(runs) >= 2:
            frames = {split: [read_predictions(location(path) / "predictions" / f"{split}.parquet") for _, path in runs]
                      for split in ("valid", "test")}
            ensemble = evaluate_predictions(seed_ensemble(frames["valid"]), seed_ensemble(frames["test"]), market)
            entries.append({"key": f"{row.key}-ensemble", "label": f"{_label(spec, row.key)} (ensemble of "
                            f"{len(runs)} seeds)", "evaluations": [ensemble], "seeds": 1, "runs": [n for n, _ in runs]})
    return entries


def _values(entry, *path):
    out = []
    for evaluation in entry["evaluations"]:
        value = evaluation
        for key in path:
            value = (value or {}).get(key) if isinstance(value, dict) else None
        out.append(value)
    return out


def _count(entry) -> str:
    done = len(entry["evaluations"])
    return f"{done}" if done >= entry["seeds"] else f"{done} of {entry['seeds']}"


def table1_frame(entries) -> tuple[str, pd.DataFrame]:
    header = ["Method", "Rank IC", "Rank ICIR", "Rank IC (index members)", "Rank ICIR (index members)", "runs"]
    rows, records = [], []
    for entry in entries:
        cells = [fmt_mean_std(_values(entry, "all", "rank_ic")), fmt_mean_std(_values(entry, "all", "rank_icir")),
                 fmt_mean_std(_values(entry, "members", "rank_ic")), fmt_mean_std(_values(entry, "members", "rank_icir"))]
        rows.append([entry["label"], *cells, _count(entry)])
        for k, evaluation in enumerate(entry["evaluations"]):
            records.append({"method": entry["label"], "run": k, **{f"{scope}_{m}": evaluation[scope][m]
                                                                    for scope in ("all", "members")
                                                                    for m in ("rank_ic", "rank_icir", "ic", "icir")}})
    return markdown_table(header, rows), pd.DataFrame(records)


def table3_frame(entries) -> tuple[str, pd.DataFrame]:
    header = ["Method", "AR", "SR", "MDD", "runs", "eta (validation)"]
    rows, records = [], []
    for entry in entries:
        for strategy, suffix in (("topk_drop", ""), ("tdrisk", " (TDrisk)")):
            values = [v for v in _values(entry, strategy) if v]
            if not values:
                continue
            etas = sorted({v["eta"] for v in values}) if strategy == "tdrisk" else []
            rows.append([entry["label"] + suffix,
                         fmt_mean_std([v["annualized_return"] for v in values], digits=2, percent=True),
                         fmt_mean_std([v["information_ratio"] for v in values], digits=2),
                         fmt_mean_std([-v["max_drawdown"] for v in values], digits=2, percent=True),
                         str(len(values)), ", ".join(f"{e:g}" for e in etas)])
            for k, v in enumerate(values):
                records.append({"method": entry["label"] + suffix, "run": k, "annualized_return": v["annualized_return"],
                                "information_ratio": v["information_ratio"], "max_drawdown": v["max_drawdown"],
                                "eta": v.get("eta")})
    return markdown_table(header, rows), pd.DataFrame(records)


def plot_figure6(entries, market, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    figure = Figure(figsize=(10, 5.5))
    axis = figure.add_subplot(1, 1, 1)
    for entry in entries:
        for strategy, suffix in (("topk_drop", ""), ("tdrisk", " (TDrisk)")):
            series = [pd.Series(v["daily_excess"]) for v in _values(entry, strategy) if v]
            if not series:
                continue
            mean = pd.concat(series, axis=1).mean(axis=1).sort_index()
            mean.index = pd.to_datetime(mean.index)
            axis.plot(mean.index, mean.cumsum(), label=entry["label"] + suffix, linewidth=1.2)
    axis.axhline(0.0, color="black", linewidth=0.6)
    axis.yaxis.set_major_formatter(PercentFormatter(1.0))
    axis.set_title(f"Cumulative excess return after costs over {market.spec.backtest.benchmark_code} "
                   f"(TopK-Drop k={market.spec.backtest.topk}, n={market.spec.backtest.n_drop}, index members; "
                   "mean over seeds)", fontsize=9)
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    tmp.replace(path)


def validation_markdown(spec, outcome, entries) -> str:
    lines = ["# What was chosen on the validation span", "",
             f"Selection grid {dict(spec.selection.grid)} with {dict(spec.selection.overrides)}, seed 0; "
             "the best final validation Rank IC wins.", ""]
    rows = []
    for key, progress in outcome.models.items():
        for name, score in progress.selection.items():
            rows.append([_label(spec, key), name, "n/a" if score is None else f"{score:.4f}",
                         "chosen" if progress.choice is not None and name == _chosen_name(key, progress.choice) else ""])
    lines += [markdown_table(["Method", "candidate", "valid Rank IC", ""], rows), ""]
    scored = [[entry["label"], _run_name(entry, k), *(_ic_cell(value, scope) for scope in ("all", "members"))]
              for entry in entries for k, value in enumerate(_values(entry, "valid")) if value]
    if scored:
        lines += [("Each run's validation predictions (its best epoch), scored on the whole universe and on "
                   "each day's index members: Rank IC / Rank ICIR. This, not the test span, is what compares "
                   "training universes for an index user."), "",
                  markdown_table(["Method", "run", "valid, all stocks", "valid, index members"], scored), ""]
    eta_rows = []
    for entry in entries:
        for k, value in enumerate(_values(entry, "tdrisk")):
            if value:
                eta_rows.append([entry["label"], _run_name(entry, k), f"{value['eta']:g}",
                                 f"{value['valid_information_ratio']:.2f}"])
    if eta_rows:
        lines += ["TDrisk's eta per run, chosen by the validation information ratio after costs:", "",
                  markdown_table(["Method", "run", "eta", "valid IR"], eta_rows), ""]
    return "\n".join(lines)


def _run_name(entry: dict, k: int) -> str:
    """The k-th evaluation's run: a seed's trial name, or every seed's for an ensemble row."""
    return entry["runs"][k] if len(entry["evaluations"]) > 1 else ", ".join(entry["runs"])


def _ic_cell(value: dict, scope: str) -> str:
    scores = value[scope]  # summarize_ic's dict; the cache's schema number guarantees both scopes
    return f"{scores['rank_ic']:.4f} / {scores['rank_icir']:.3f}"


def _chosen_name(key: str, choice: dict) -> str:
    from fvae_dist.reproduce.run import candidate_name

    return candidate_name(key, choice)


def provenance(spec, outcome) -> dict:
    def commit() -> str | None:
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parents[2]).stdout.strip() or None
        except OSError:
            return None

    runs = {}
    for progress in outcome.models.values():
        for name, path in progress.runs.items():
            config = location(path) / "config.yaml"
            runs[name] = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None
    return {"command": " ".join(["fvae-dist", *sys.argv[1:]]) if sys.argv else None, "spec": spec.source,
            "commit": commit(), "packages": {p: _version(p) for p in PACKAGES}, "python": sys.version.split()[0],
            "config_sha256": runs}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_tables(spec, outcome, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    out = Path(spec.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    market = Market(spec)
    entries = _rows(spec, outcome, market, log)
    files = {}
    text, frame = table1_frame(entries)
    files["table1_md"], files["table1_csv"] = out / "table1.md", out / "table1.csv"
    write_text_atomic(files["table1_md"], text + "\n")
    write_text_atomic(files["table1_csv"], frame.to_csv(index=False))
    text, frame = table3_frame(entries)
    files["table3_md"], files["table3_csv"] = out / "table3.md", out / "table3.csv"
    write_text_atomic(files["table3_md"], text + "\n")
    write_text_atomic(files["table3_csv"], frame.to_csv(index=False))
    if any(_values(entry, "topk_drop") for entry in entries):
        files["figure6"] = out / "figure6.png"
        plot_figure6(entries, market, files["figure6"])
    if outcome.robustness is not None and not outcome.robustness.results.empty:
        text, frame = table2(outcome.robustness.results)
        files["table2_md"], files["table2_csv"] = out / "table2.md", out / "table2.csv"
        write_text_atomic(files["table2_md"], text + "\n")
        write_text_atomic(files["table2_csv"], frame.to_csv(index=False))
    files["validation"] = out / "validation.md"
    write_text_atomic(files["validation"], validation_markdown(spec, outcome, entries))
    files["provenance"] = out / "reproduce.json"
    write_text_atomic(files["provenance"], json.dumps(provenance(spec, outcome), indent=1) + "\n")
    log(f"reproduce: tables in {out}")
    return files
