"""Paths given to a command that runs as a Ray job (`fvae-dist submit`, `ray job submit`).

Ray runs a job's entrypoint in its own unpacked copy of the job's working_dir
(.../runtime_resources/working_dir_files/_ray_pkg_<hash>/, the entrypoint's current directory),
which it deletes with the job: a relative data.dataset_dir or storage path resolves there, and
what a run writes there is lost. Ray offers no durable place to resolve them against (which
storage every node sees is the cluster's business), so such paths are refused with one line:

    require_durable("ray.storage_path", value)    ConfigError when, inside such a job, the path
                                                  lies in the job's copy of its working_dir
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fvae_dist.errors import ConfigError

# Set by Ray's job supervisor in the environment of a job's entrypoint: the job's config, its
# runtime_env included (ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR).
JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_working_dir() -> str | None:
    """The working_dir of the Ray job whose entrypoint this process is, or None (not a job, or a
    job without working_dir: relative paths then mean what they mean in the shell)."""
    raw = os.environ.get(JOB_CONFIG_VARIABLE)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return runtime_env.get("working_dir") or None


def require_durable(setting: str, value: str | os.PathLike) -> None:
    """Refuse a path (relative, or made absolute already) that lies in the job's temporary copy
    of its working_dir; bucket URIs and paths outside it pass. `setting` is a config key
    ("ray.storage_path") or, with a space, what the path is ("experiment folder")."""
    value = str(value)
    if not value or "://" in value or job_working_dir() is None:
        return
    copy = Path.cwd().resolve()
    path = Path(value).expanduser().resolve()
    if path != copy and copy not in path.parents:
        return
    named = f"{setting}={value}" if " " not in setting else f"{setting} {value}"
    raise ConfigError(f"{named} lies in Ray's temporary copy of the job's working directory ({copy}), "
                      "which is deleted with the job: give an absolute path on storage every node sees, or a "
                      "bucket URI (s3://bucket/...)")
