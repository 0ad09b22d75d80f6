"""job_paths.py: inside a Ray job, a path in Ray's temporary copy of the working directory is
refused with one line; outside a job, or for absolute paths elsewhere and bucket URIs, nothing."""
from __future__ import annotations

import json

import pytest

from fvae_dist.errors import ConfigError
from fvae_dist.job_paths import JOB_CONFIG_VARIABLE, require_durable


def test_relative_paths_are_refused_inside_a_job_with_a_working_dir(tmp_path, monkeypatch):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)  # where Ray starts a job's entrypoint
    monkeypatch.setenv(JOB_CONFIG_VARIABLE, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}}))
    with pytest.raises(ConfigError, match=r"^ray.storage_path=runs lies in Ray's temporary copy of the job's "
                                          r"working directory \(.*_ray_pkg_abc\), which is deleted with the job: "
                                          r"give an absolute path on storage every node sees, or a bucket URI"):
        require_durable("ray.storage_path", "runs")
    with pytest.raises(ConfigError, match=r"^experiment folder .*_ray_pkg_abc/tune lies in"):
        require_durable("experiment folder", copy / "tune")  # made absolute already, still in the copy
    require_durable("ray.storage_path", str(tmp_path / "shared" / "runs"))
    require_durable("ray.storage_path", "s3://bucket/runs")


def test_outside_a_job_relative_paths_are_the_shell_s(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_CONFIG_VARIABLE, raising=False)
    require_durable("ray.storage_path", "runs")
    # a job without working_dir runs where its submitter said
    monkeypatch.setenv(JOB_CONFIG_VARIABLE, json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    require_durable("data.dataset_dir", "data/csi300")
