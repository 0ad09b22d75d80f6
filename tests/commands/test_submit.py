"""`fvae-dist submit` without a cluster: what it would submit, and one clear line for what it
cannot. The submission itself runs in tests/cluster/test_job_submission.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fvae_dist.cli import main
from fvae_dist.commands.submit import job_entrypoint, job_runtime_env
from fvae_dist.errors import ConfigError
from fvae_dist.train.local_ray import free_local_port

REPO = Path(__file__).resolve().parents[2]


def test_the_job_runs_the_command_in_this_repository():
    assert job_entrypoint("train", ["--config", "tune_configs/demo.yaml", "ray.run_name=a b"]) == \
        "fvae-dist train --config tune_configs/demo.yaml 'ray.run_name=a b'"
    runtime_env = job_runtime_env(None)
    assert runtime_env["working_dir"] == str(REPO)
    assert ".venv" in runtime_env["excludes"] and ".git" in runtime_env["excludes"]


def test_unknown_command_and_secrets_in_the_runtime_env_are_refused(tmp_path, capsys):
    assert main(["submit", "trian", "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err.strip() == ("fvae-dist submit: error: COMMAND 'trian' is not an fvae-dist "
                                               "command; did you mean 'train'?")
    with pytest.raises(ConfigError, match="submit"):
        job_entrypoint("submit", [])
    leaky = tmp_path / "runtime_env.yaml"
    leaky.write_text(yaml.safe_dump({"working_dir": ".", "env_vars": {"RAY_AUTH_TOKEN": "x", "OMP_NUM_THREADS": "1"}}))
    with pytest.raises(ConfigError, match=r"env_vars RAY_AUTH_TOKEN would be stored with the job"):
        job_runtime_env(str(leaky))


def test_no_cluster_at_the_address_is_one_line(capsys):
    address = f"http://127.0.0.1:{free_local_port()}"
    assert main(["submit", "--address", address, "--no-wait", "train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fvae-dist submit: error: --address {address}: ") and len(err.strip().splitlines()) == 1
