"""TensorBoard events of a run (written by rank 0 only): `tensorboard --logdir <run>/tensorboard`.

Scalars, one point per epoch:
    train/loss train/nll train/kl               eq. 17 terms averaged over the epoch's steps
    valid/loss valid/nll valid/kl               the same on the validation split (eval mode)
    valid/ic valid/rank_ic valid/icir valid/rank_icir
    lr                                          learning rate used in the epoch
    perf/stock_days_per_s                       training stock-days per second, all workers, data + step
    perf/data_wait_fraction                     share of the epoch the workers waited for input
    perf/step_fraction                          share of the epoch spent in training steps
    perf/minor_faults_per_step                  page faults of a worker's training thread per step
    perf/epoch_seconds
The HParams dashboard gets the resolved config against the final metrics (run "hparams").
"""
from __future__ import annotations

import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

TAG_GROUPS = ("train", "valid", "test", "perf")


def tag_for(metric: str) -> str:
    """Metric key -> TensorBoard tag: "valid_rank_ic" -> "valid/rank_ic"; "lr" stays "lr"."""
    group, sep, rest = metric.partition("_")
    return f"{group}/{rest}" if sep and group in TAG_GROUPS else metric


class RunEvents:
    """Per-epoch scalars and the final hparams summary of one run."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag_for(key), float(value), global_step=epoch)
        self.writer.flush()

    def log_hparams(self, hparams: dict, final_metrics: dict[str, float]) -> None:
        metric_dict = {
            f"hparam/{key}": float(value)
            for key, value in final_metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        self.writer.add_hparams(_hparam_values(hparams), metric_dict, run_name="hparams")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _hparam_values(config: dict, prefix: str = "") -> dict:
    """Flatten a nested config to the scalar types the HParams plugin accepts."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_hparam_values(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
