"""`fvae-dist submit [--address URL] [--no-wait] COMMAND ARGS...`: another command as a Ray job.

The job runs `fvae-dist COMMAND ARGS...` on the cluster, in Ray's copy of this repository (the
runtime env of cluster/runtime_env.yaml, its working_dir taken relative to the repository): the
code and presets of this checkout, the data and run folders on the cluster's storage (absolute
paths or bucket URIs; a relative path would land in Ray's temporary copy and is refused there,
fvae_dist/job_paths.py). `fvae-dist` must be on the PATH of the cluster's Ray processes (the
image of cluster/Dockerfile has it; on hand-started nodes, start Ray from the environment where
fvae-dist is installed).

The cluster's token is Ray's: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
~/.ray/auth_token; it travels in the requests' header only, never in the job's runtime env,
entrypoint or metadata (which the dashboard shows to anyone it lets in).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RUNTIME_ENV = Path("cluster") / "runtime_env.yaml"
FAILED = 1
INTERRUPTED = 130
# Environment variables a runtime env must not carry: the job stores them where the dashboard
# shows them.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run another fvae-dist command as a Ray job on a cluster (this repository as its working dir)",
        description="Submits `fvae-dist COMMAND ARGS...` to the cluster's job server with this repository as "
        "the job's working directory and cluster/runtime_env.yaml's settings, prints the job id, then follows "
        "the job's logs until it ends (exit status 1 unless it succeeded). Paths in ARGS and presets must be "
        "absolute paths on the cluster's storage or bucket URIs. The token comes from RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
    )
    parser.add_argument("--address", default=None,
                        help=f"the cluster's dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument("--runtime-env", default=None, metavar="YAML",
                        help=f"runtime env of the job (default: {RUNTIME_ENV} of this repository)")
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--follow", dest="follow", action="store_true", default=True,
                      help="print the job's logs until it ends; exit status 1 unless it succeeded (the default)")
    wait.add_argument("--no-wait", dest="follow", action="store_false", help="print the job id and return")
    # (not dest="command": the top-level parser keeps the subcommand's name there, for error lines)
    parser.add_argument("job_command", metavar="COMMAND", help="the fvae-dist command to run: train, tune, robustness, ...")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")
    parser.set_defaults(func=run)


def run(args) -> int:
    entrypoint = job_entrypoint(args.job_command, args.job_args)
    runtime_env = job_runtime_env(args.runtime_env)
    address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    client = _connect(address)
    job_id = _submit(client, address, entrypoint, runtime_env)
    print(f"submitted job {job_id} to {address}: {entrypoint}", flush=True)
    if not args.follow:
        print(f"follow it: ray job logs --follow --address {address} {job_id}")
        return 0
    try:
        _follow_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (ray job stop --address {address} {job_id})")
        return INTERRUPTED
    info = client.get_job_info(job_id)
    print(f"job {job_id} {info.status}" + (f": {info.message}" if info.status != "SUCCEEDED" and info.message else ""))
    return 0 if info.status == "SUCCEEDED" else FAILED


def job_entrypoint(command: str, args: list[str]) -> str:
    """The job's shell command: `fvae-dist COMMAND ARGS...`, each word quoted."""
    from fvae_dist.cli import COMMANDS
    from fvae_dist.errors import ConfigError, nearest_name_hint

    runnable = [name for name in COMMANDS if name != "submit"]
    if command not in runnable:
        raise ConfigError(f"COMMAND {command!r} is not an fvae-dist command{nearest_name_hint(command, runnable)}")
    return shlex.join(["fvae-dist", command, *args])


def job_runtime_env(path: str | None) -> dict:
    """The runtime env YAML with its working_dir made absolute (relative to the repository)."""
    import yaml

    from fvae_dist.errors import ConfigError

    repository = Path(__file__).resolve().parents[2]
    path = Path(path) if path else repository / RUNTIME_ENV
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; fvae-dist submit ships a repository checkout as the job's working "
                          f"directory and reads its {RUNTIME_ENV} (or pass --runtime-env YAML)")
    runtime_env = yaml.safe_load(path.read_text()) or {}
    if not isinstance(runtime_env, dict):
        raise ConfigError(f"{path}: expected a mapping of runtime env fields (working_dir, excludes, env_vars)")
    secrets = [name for name in runtime_env.get("env_vars") or {} if SECRET_NAME.search(name)]
    if secrets:
        raise ConfigError(f"{path}: env_vars {', '.join(secrets)} would be stored with the job, where the dashboard "
                          "shows them; give secrets to the cluster's nodes (their environment) instead")
    working_dir = Path(runtime_env.get("working_dir", "."))
    runtime_env["working_dir"] = str(working_dir if working_dir.is_absolute() else (repository / working_dir).resolve())
    return runtime_env


# Ray's job client logs each file it leaves out of the package and each step of the upload;
# the job id and the job's own output are what matter here.
_CHATTY_LOGGERS = ("ray._private.runtime_env.working_dir", "ray._private.runtime_env.packaging",
                   "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")


def _connect(address: str):
    import logging

    from fvae_dist.errors import ConfigError
    from fvae_dist.train.local_ray import enable_token_auth_if_token_at_hand

    enable_token_auth_if_token_at_hand()  # Ray's client sends the token only with RAY_AUTH_MODE=token
    from ray.job_submission import JobSubmissionClient

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # requests' ConnectionError, Ray's RuntimeError for a refused token
        raise ConfigError(f"--address {address}: {_first_line(exc)}") from None


def _submit(client, address: str, entrypoint: str, runtime_env: dict) -> str:
    from fvae_dist.errors import ConfigError

    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except RuntimeError as exc:
        raise ConfigError(f"--address {address}: the job was not accepted: {_first_line(exc)}") from None


def _follow_logs(client, job_id: str) -> None:
    """The job's output as it comes, until the job ends."""
    import asyncio
    import time

    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError:  # the log stream broke off (e.g. the dashboard restarted): wait for the end
        pass
    while not JobStatus(client.get_job_status(job_id)).is_terminal():
        time.sleep(2)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
