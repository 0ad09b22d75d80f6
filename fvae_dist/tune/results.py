"""A campaign's results, rewritten whenever a trial ends, in its experiment folder:

    results.csv, results.md  one row per trial, best score first
    best_config.yaml         the best trial's config; `fvae-dist train --config` accepts it as is
    best_checkpoint.txt      path of the best trial's best-epoch checkpoint
    summary.json             the same facts for scripts

Every file is written atomically (config.write_text_atomic): a reader sees the previous table
or the new one.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from fvae_dist.config import ExperimentConfig, config_to_dict, json_safe, with_overrides, write_text_atomic
from fvae_dist.storage import location, read_json

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
BEST_CONFIG_FILE = "best_config.yaml"
BEST_CHECKPOINT_FILE = "best_checkpoint.txt"
SUMMARY_FILE = "summary.json"
TRIAL_DIR_PREFIX = "trial_"


@dataclass
class TrialRow:
    """One line of the results table."""

    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    outcome: str  # completed / stopped early (patience) / stopped by ASHA / failed / unfinished
    score: float | None
    params: dict
    epochs: int
    wall_s: float | None
    final_valid_rank_ic: float | None
    final_test_rank_ic: float | None
    run_dir: str
    best_checkpoint: str | None
    error: str = ""


def trial_config(base: ExperimentConfig, params: Mapping[str, Any], experiment_dir: str | Path,
                 trial_id: str) -> ExperimentConfig:
    """The config a campaign trial trains: the base, the proposed hyperparameters, its own run
    folder (which is also Tune's folder of the trial)."""
    return with_overrides(base, {
        **params,
        "ray.storage_path": str(experiment_dir),
        "ray.run_name": f"{TRIAL_DIR_PREFIX}{trial_id}",
    })


def write_results(spec, experiment_dir: Path, trials: Sequence, ended: Mapping[str, str] | None = None) -> list[TrialRow]:
    """results.csv / results.md (best first), best_config.yaml, best_checkpoint.txt, summary.json
    of a campaign (tune.spec.CampaignSpec) from Tune's trials. `ended` overrides the status of
    trials that Tune has not marked as ended yet."""
    ended = ended or {}
    rows = sort_rows([trial_row(spec, experiment_dir, t, ended.get(t.trial_id)) for t in trials], spec.tune.mode)
    keys = [p.key for p in spec.space]
    write_text_atomic(experiment_dir / RESULTS_CSV, results_csv(rows, keys, spec.tune.metric))
    write_text_atomic(experiment_dir / RESULTS_MD, results_markdown(rows, keys, spec))
    best = best_row(rows)
    summary = {
        "experiment_dir": str(experiment_dir),
        "metric": spec.tune.metric,
        "mode": spec.tune.mode,
        "num_samples": spec.tune.num_samples,
        "trials": {status: sum(r.status == status for r in rows) for status in sorted({r.status for r in rows})},
        "best": None,
        "tensorboard": f"tensorboard --logdir {experiment_dir}",
    }
    if best is not None:
        best_cfg = best_config(spec, experiment_dir, best)
        header = (f"# Best trial {best.trial_id} of campaign {spec.tune.name}: {spec.tune.metric} = {best.score:.6g}\n"
                  f"# Its run folder: {best.run_dir}\n"
                  f"# Retrain it with: fvae-dist train --config {experiment_dir / BEST_CONFIG_FILE}\n")
        write_text_atomic(experiment_dir / BEST_CONFIG_FILE,
                          header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False))
        write_text_atomic(experiment_dir / BEST_CHECKPOINT_FILE, best.best_checkpoint + "\n")
        summary["best"] = {**dataclasses.asdict(best), "config": str(experiment_dir / BEST_CONFIG_FILE)}
    write_text_atomic(experiment_dir / SUMMARY_FILE, json.dumps(json_safe(summary), indent=1))
    return rows


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The best-scored trial that kept a checkpoint (rows sorted best first)."""
    return next((r for r in rows if r.best_checkpoint and r.score is not None), None)


def trial_row(spec, experiment_dir: Path, trial, status: str | None = None) -> TrialRow:
    status = status or str(trial.status)
    run_dir = experiment_dir / f"{TRIAL_DIR_PREFIX}{trial.trial_id}"
    metrics = read_metrics(run_dir)
    last = dict(trial.last_result or {})
    score = _number(last.get(spec.tune.metric))
    if score is None and metrics.get("history"):
        score = _number(metrics["history"][-1].get(spec.tune.metric))
    final = metrics.get("final") or {}
    best_checkpoint = None
    if metrics.get("best_checkpoint") and (run_dir / metrics["best_checkpoint"]).is_dir():
        best_checkpoint = str(run_dir / metrics["best_checkpoint"])
    return TrialRow(
        trial_id=trial.trial_id,
        status=status,
        outcome=_outcome(status, metrics, spec.base.train.epochs),
        score=score,
        params={k: trial.config.get(k) for k in (p.key for p in spec.space)},
        epochs=int(metrics.get("epochs_completed") or 0),
        wall_s=_number(last.get("time_total_s")),
        final_valid_rank_ic=_number((final.get("valid") or {}).get("rank_ic")),
        final_test_rank_ic=_number((final.get("test") or {}).get("rank_ic")),
        run_dir=str(run_dir),
        best_checkpoint=best_checkpoint,
        error=trial_error(trial) if status == "ERROR" else "",
    )


def sort_rows(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Best score first; trials without a score last, in trial order."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r.score is None, sign * r.score if r.score is not None else 0.0, r.trial_id))


def best_config(spec, experiment_dir: Path, best: TrialRow) -> ExperimentConfig:
    """The best trial's training config as a fresh run: its hyperparameters, the base's run folder
    parent and a new run name, so `fvae-dist train --config best_config.yaml` retrains it."""
    cfg = trial_config(spec.base, best.params, experiment_dir, best.trial_id)
    return with_overrides(cfg, {"ray.storage_path": spec.base.ray.storage_path,
                                "ray.run_name": f"{spec.tune.name}-best"})


def results_csv(rows: Sequence[TrialRow], keys: Sequence[str], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "trial_id", "status", "outcome", metric, *keys, "epochs", "wall_s",
                     "final_valid_rank_ic", "final_test_rank_ic", "best_checkpoint", "error"])
    for i, r in enumerate(rows, 1):
        writer.writerow([i, r.trial_id, r.status, r.outcome, _csv(r.score), *(_csv(r.params.get(k)) for k in keys),
                         r.epochs, _csv(r.wall_s), _csv(r.final_valid_rank_ic), _csv(r.final_test_rank_ic),
                         r.best_checkpoint or "", r.error])
    return out.getvalue()


def results_markdown(rows: Sequence[TrialRow], keys: Sequence[str], spec) -> str:
    head = ["#", "trial", "outcome", spec.tune.metric, *keys, "epochs", "wall s", "final valid Rank IC",
            "final test Rank IC"]
    lines = [
        f"# Campaign {spec.tune.name}",
        "",
        f"{len(rows)} of {spec.tune.num_samples} trials, sorted by {spec.tune.metric} ({spec.tune.mode}). "
        f"Search space: " + "; ".join(f"{p.key} {p.describe()}" for p in spec.space) + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r.trial_id, r.outcome, _fmt(r.score), *(_fmt(r.params.get(k)) for k in keys), str(r.epochs),
                 _fmt(r.wall_s, 1), _fmt(r.final_valid_rank_ic), _fmt(r.final_test_rank_ic)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def trial_error(trial) -> str:
    """One line saying why a Tune trial failed: the user's own error inside Ray's wrappers when
    Tune kept the exception, else the last line of its error file."""
    from fvae_dist.errors import error_line

    try:
        error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - an unreadable pickle falls back to the text file
        error = None
    if error is not None:
        return error_line(error)[:300]
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed (no error file)"


def read_metrics(run_dir) -> dict:
    """A Train run's metrics.json ({} when it has none yet)."""
    return read_json(location(run_dir) / "metrics.json") or {}


def _outcome(status: str, metrics: dict, max_epochs: int) -> str:
    if status == "ERROR":
        return "failed"
    if status != "TERMINATED":
        return "unfinished"
    if metrics.get("final"):
        return "stopped early (patience)" if metrics.get("stopped_early") else "completed"
    return "stopped by ASHA" if int(metrics.get("epochs_completed") or 0) < max_epochs else "stopped"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _csv(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if (abs(value) < 1e-3 and value != 0) else f"{value:.{digits}f}"
    return str(value)
