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

Every epoch appears exactly once, whatever crashed and restarted: a (re)started run writes a new
events file that begins with the epochs its checkpoint holds, then removes the files of earlier
attempts, which may hold an epoch the checkpoint does not (trained, logged, then lost before its
checkpoint was registered) or lack one (checkpointed, then lost before it was logged).
On a storage URI (s3://...) the events are written to a local folder and copied to the run
folder after every epoch: TensorBoard reads them from there (`tensorboard --logdir s3://...`).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from fvae_dist.storage import UriPath, files_under, upload_file

TAG_GROUPS = ("train", "valid", "test", "perf")
EVENTS_PATTERN = "events.out.tfevents.*"


def tag_for(metric: str) -> str:
    """Metric key -> TensorBoard tag: "valid_rank_ic" -> "valid/rank_ic"; "lr" stays "lr"."""
    group, sep, rest = metric.partition("_")
    return f"{group}/{rest}" if sep and group in TAG_GROUPS else metric


class RunEvents:
    """Per-epoch scalars and the final hparams summary of one run attempt; `history` is the
    per-epoch metrics the attempt starts from (its checkpoint's)."""

    def __init__(self, log_dir: "str | Path | UriPath", history: list[dict] = ()):
        self.target = log_dir if isinstance(log_dir, UriPath) else Path(log_dir)
        self._scratch = tempfile.TemporaryDirectory(prefix="fvae-tb-") if isinstance(log_dir, UriPath) else None
        self.local_dir = Path(self._scratch.name) if self._scratch else self.target
        earlier_attempts = files_under(self.target, EVENTS_PATTERN)
        self.writer = SummaryWriter(log_dir=str(self.local_dir))
        for metrics in history:
            self._add_epoch(int(metrics["epoch"]), metrics)
        self._publish()
        for path in earlier_attempts:
            path.unlink(missing_ok=True)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._add_epoch(epoch, metrics)
        self._publish()

    def log_hparams(self, hparams: dict, final_metrics: dict[str, float]) -> None:
        metric_dict = {
            f"hparam/{key}": float(value)
            for key, value in final_metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        self.writer.add_hparams(_hparam_values(hparams), metric_dict, run_name="hparams")
        self._publish()

    def close(self) -> None:
        self.writer.close()
        self._publish()
        if self._scratch is not None:
            self._scratch.cleanup()

    def _add_epoch(self, epoch: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag_for(key), float(value), global_step=epoch)

    def _publish(self) -> None:
        """Flush, and copy this attempt's files to a URI's run folder (nothing to copy locally)."""
        self.writer.flush()
        if self._scratch is None:
            return
        for path in files_under(self.local_dir):
            upload_file(path, self.target / path.relative_to(self.local_dir).as_posix())


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
