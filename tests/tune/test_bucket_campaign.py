"""`fvae-dist tune` with tune.storage_path=s3://...: Tune's state and every trial's run folder on
a real S3-protocol server (tests/s3_server.py); the campaign's driver interrupted, rerun, and no
finished trial trained again; nothing written to a local folder named after the URI."""
from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fvae_dist.storage import UriPath
from tests.s3_server import s3_server
from tests.process_tree import kill_tree
from tests.tune.conftest import campaign, wait_for

pytestmark = [pytest.mark.ray]


def _rows(folder: UriPath) -> list[dict]:
    path = folder / "results.csv"
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []


@pytest.mark.timeout(900)
def test_a_campaign_on_a_bucket_resumes_without_rerunning_finished_trials(tmp_path, toy_dir):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    with s3_server() as s3:
        storage = s3.make_bucket("tune") + "/campaigns"
        data = campaign(tmp_path, toy_dir, storage_path=storage, num_samples=2, max_concurrent_trials=1)
        data["base"]["overrides"]["train.epochs"] = 2
        config = tmp_path / "campaign.yaml"
        config.write_text(yaml.safe_dump(data))
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **s3.env}
        folder = UriPath.parse(f"{storage}/exp")
        os.environ.update(s3.env)
        try:
            log = tmp_path / "first.log"
            first = subprocess.Popen([sys.executable, "-m", "fvae_dist.cli", "tune", "--config", str(config)],
                                     cwd=workdir, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
            try:
                deadline = time.monotonic() + 420
                finished: list[dict] = []
                while not finished and first.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.5)
                    finished = [r for r in _rows(folder) if r["status"] == "TERMINATED"]
                assert finished, f"no trial finished; driver log:\n{log.read_text()[-3000:]}"
                metrics = {r["trial_id"]: (folder / f"trial_{r['trial_id']}" / "metrics.json").read_text()
                           for r in finished}
                if first.poll() is None:
                    first.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves the experiment state and stops
                assert wait_for(first, 120) in (0, 130), log.read_text()[-3000:]
            finally:
                kill_tree(first)

            second = subprocess.run([sys.executable, "-m", "fvae_dist.cli", "tune", "--config", str(config)],
                                    cwd=workdir, env=env, capture_output=True, text=True, timeout=420)
            assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
            rows = _rows(folder)
            assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
            for trial_id, text in metrics.items():
                assert (folder / f"trial_{trial_id}" / "metrics.json").read_text() == text, f"{trial_id} trained again"
            for r in rows:
                run = folder / f"trial_{r['trial_id']}"
                assert list((run / "tensorboard").glob("events.out.tfevents.*")), r["trial_id"]
                assert r["best_checkpoint"].startswith(str(run)), r["best_checkpoint"]
            assert (folder / "best_config.yaml").is_file()
            assert list(workdir.iterdir()) == [], "a local folder was written instead of the bucket"
        finally:
            for key in s3.env:
                os.environ.pop(key, None)
