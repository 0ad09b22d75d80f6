"""cluster/: the image, the KubeRay job and the runtime env run what the tests run (no Ray here):
the same entry points, presets that the image holds, token authentication, no secrets, runs on a
bucket."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from fvae_dist.cli import COMMANDS
from fvae_dist.commands.submit import job_runtime_env

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def copied_into_image() -> set[str]:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    return {source for line in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE) for source in line.split()}


def test_the_image_holds_what_the_entry_points_read_and_builds_the_fast_paths():
    assert {"pyproject.toml", "fvae_dist", "tune_configs", "scripts"} <= copied_into_image()
    assert "python -m fvae_dist.accel build" in (CLUSTER / "Dockerfile").read_text()


def test_the_kuberay_job_runs_fvae_dist_with_a_preset_of_the_image_and_token_authentication():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "fvae-dist" and argv[1] in COMMANDS
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file() and config.split("/")[0] in copied_into_image()
    settings = dict(arg.split("=", 1) for arg in argv[2:] if "=" in arg)
    assert settings["ray.storage_path"].startswith("s3://")
    assert settings["data.dataset_dir"].startswith("/")  # absolute: a job's relative path is refused
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"]),
            job["spec"]["submitterPodTemplate"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {item["name"]: item for item in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # from a Secret, not this file


def test_the_runtime_env_ships_this_repository_without_secrets():
    runtime_env = job_runtime_env(None)  # refuses secret-looking env_vars
    assert runtime_env["working_dir"] == str(REPO)
    assert {"data", "runs", ".venv"} <= set(runtime_env["excludes"])
