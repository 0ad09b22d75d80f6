"""Runs whose only storage is a bucket: `fvae-dist train` with its data set and ray.storage_path on s3:// against
a real S3-protocol server on loopback (moto's, tests/s3_server.py), its driver killed mid-run,
the latest checkpoint damaged, the same command rerun, and predictions read from the bucket.

Everything happens in subprocesses, as a user runs it: each command starts its own local Ray
cluster, whose processes take the credentials and the endpoint from the environment only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvae_dist.data.prepare import upload_dataset
from fvae_dist.storage import UriPath, download_dir, files_under, read_parquet
from fvae_dist.train import checkpoint as ckpt
from tests.process_tree import kill_tree
from tests.s3_server import s3_server
from tests.toy_dataset import tiny_overrides, write_toy_dataset

pytestmark = [pytest.mark.ray]

EPOCHS = 5
RUN = "bucket-run"


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "fvae_dist.cli", *args]


def _train_args(dataset, storage):
    return ["train", *tiny_overrides(dataset, storage, RUN, f"train.epochs={EPOCHS}", "train.keep_checkpoints=10",
                                     "train.early_stopping_patience=0", "ray.num_cpus=2", "ray.max_failures=0")]


def _tensorboard_epochs(run: UriPath, tmp_path: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = download_dir(run / "tensorboard", tmp_path / "tb")
    steps = []
    for path in sorted(local.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        steps += [event.step for event in accumulator.Scalars("train/loss")]
    return sorted(steps)


@pytest.mark.timeout(900)
def test_train_on_a_bucket_survives_a_killed_driver_and_a_damaged_checkpoint(tmp_path):
    dataset = write_toy_dataset(tmp_path / "dataset", split_days={"train": 96, "valid": 16, "test": 16},
                                shards_per_split={"train": 3, "valid": 1, "test": 1})
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    with s3_server() as s3:
        storage = s3.make_bucket("fvae") + "/runs"
        env = {**os.environ, **s3.env}
        run = UriPath.parse(f"{storage}/{RUN}")
        os.environ.update(s3.env)  # this process reads the bucket too
        try:
            # the data set lives on the bucket too: Ray Data's read tasks and predict read it there
            upload_dataset(dataset, UriPath.parse("s3://fvae/data/toy"))
            dataset = "s3://fvae/data/toy"
            # 1. train, and kill the driver (and its whole local cluster) once 3 epochs are on the bucket
            first = subprocess.Popen(_command(*_train_args(dataset, storage)), cwd=workdir, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + 400
                while time.monotonic() < deadline and first.poll() is None:
                    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
                    if metrics.get("epochs_completed", 0) >= 3:
                        break
                    time.sleep(0.3)
                assert first.poll() is None, "the run ended before it could be killed:\n" + first.stdout.read().decode()[-3000:]
            finally:
                kill_tree(first)
            kept = ckpt.list_checkpoints(run)
            assert len(kept) >= 3, [str(path) for path in kept]
            done = ckpt.checkpoint_epoch(kept[-1])

            # 2. damage the newest checkpoint on the bucket, as a torn upload would
            state = kept[-1] / ckpt.STATE_FILE
            state.write_bytes(state.read_bytes()[:100])

            # 3. the same command continues from the newest checkpoint that reads back
            second = subprocess.run(_command(*_train_args(dataset, storage)), cwd=workdir, env=env,
                                    capture_output=True, text=True, timeout=500)
            output = second.stdout + second.stderr
            assert second.returncode == 0, output[-4000:]
            assert f"cannot resume from {kept[-1]}: {state}: not a readable checkpoint file" in output
            assert f"resuming from {ckpt.checkpoint_dir_name(done - 1)}" in output

            metrics = json.loads((run / "metrics.json").read_text())
            assert [h["epoch"] for h in metrics["history"]] == list(range(EPOCHS))
            assert metrics["final"]["test"]["days"] == 16
            assert _tensorboard_epochs(run, tmp_path) == list(range(EPOCHS)), "every epoch once in TensorBoard"
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            on_bucket = EventAccumulator(str(run / "tensorboard"))  # what `tensorboard --logdir s3://...` reads
            on_bucket.Reload()
            assert [event.step for event in on_bucket.Scalars("train/loss")] == list(range(EPOCHS))

            # 4. predict from the bucket into the bucket
            predicted = subprocess.run(_command("predict", "--run", str(run), "--split", "test"), cwd=workdir,
                                       env=env, capture_output=True, text=True, timeout=300)
            assert predicted.returncode == 0, predicted.stdout + predicted.stderr
            frame = read_parquet(run / "predictions" / "test.parquet")
            assert frame["date"].nunique() == 16 and frame["mu"].notna().all()

            # nothing was written beside the working directory, nothing secret into the run folder
            assert sorted(p.name for p in workdir.iterdir()) == []
            for path in files_under(run):
                if path.name.endswith((".json", ".yaml", ".txt")):
                    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in path.read_text(), path
        finally:
            for key in s3.env:
                os.environ.pop(key, None)
