"""How `fvae-dist` gets its Ray: a cluster of its own on this machine, or the one it is given.

    start_local_ray(num_cpus)   a new cluster (ray.address empty, no RAY_ADDRESS): it answers this
                                machine only, asks for Ray's token, and ends with the command
    join_ray(address)           an existing cluster, with the cluster's token when one is at hand

A local cluster:
- binds every port to 127.0.0.1. Ray binds its servers (GCS, raylet, object manager, workers,
  dashboard agent, runtime env agent, metrics endpoints) to the node's IP address, and to
  127.0.0.1 when that is the node's address; but on Linux ray.init turns 127.0.0.1 (also
  `_node_ip_address="127.0.0.1"`) into the machine's outward address, except in the single-machine
  mode Ray uses on macOS and Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). The autoscaler's and
  the dashboard's metrics endpoints have fixed default ports (44217, 44227) that a second cluster
  on the machine cannot bind: port 0 lets the system choose. tests/train/test_local_cluster.py
  checks the listening sockets of every process of such a cluster.
- uses token authentication: Ray (2.59 and later) turns it on for a cluster that ray.init starts
  unless RAY_AUTH_MODE says otherwise, with the token in RAY_AUTH_TOKEN, the file
  RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token (generated there when missing).
- ends with the command that started it, also when that command is killed (cluster_guard.py).
- has its dashboard on a port chosen here, named in every process's environment (state_api_env).
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
from contextlib import contextmanager
from typing import Iterator, Mapping

import ray

from fvae_dist.errors import ConfigError
from fvae_dist.train.cluster_guard import guarded_start

LOOPBACK = "127.0.0.1"

# What makes ray.init's processes (they read it when they start) take 127.0.0.1 as the node's
# address and bind their metrics endpoints to ports the system chooses.
LOCAL_START_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "AUTOSCALER_METRIC_PORT": "0",
    "DASHBOARD_METRIC_PORT": "0",
}

# What a local cluster's processes need not say: Ray Train's preemption watcher (it reacts to a
# node being drained, e.g. a spot instance reclaimed, which a cluster on one machine never is; its
# actor start logs an "E" line about object store arguments), and Ray's own deprecation warnings
# about its internal calls (e.g. Ray Data's DatasetManager), which a user cannot act on.
LOCAL_QUIET_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning"}

START_ATTEMPTS = 5
# Where the dashboard's port is drawn from: above Ray's worker ports (10002-19999 by default) and
# below Linux's ephemeral range (32768 and up), from which every other process of the cluster
# takes its ports while it starts. A port the kernel handed out (bind to port 0) could be handed
# out again to one of them before the dashboard binds it.
DASHBOARD_PORT_RANGE = (20000, 32000)

# Ray's notice that it turned token authentication on by default (it asks to opt out), printed by
# every run otherwise.
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def start_local_ray(num_cpus: int) -> None:
    """Start a local Ray cluster of num_cpus CPUs, with its dashboard (whose State API Ray Train's
    PlacementGroupCleaner needs) on 127.0.0.1."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise ConfigError(f"RAY_AUTH_MODE={mode} is set, but the local Ray cluster fvae-dist starts always uses "
                          "token authentication: unset RAY_AUTH_MODE (or set it to token)")
    with guarded_start(), _loopback_node(), _quiet(_TOKEN_NOTICE_LOGGER):
        _init_with_dashboard(num_cpus)


def join_ray(address: str | None) -> None:
    """Connect to an existing cluster: ray.address, or RAY_ADDRESS (set inside a Ray job).

    Ray 2.60 asks for the token only when RAY_AUTH_MODE=token is set, except for a cluster it
    finds by itself; with a token at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)
    and no mode set, the mode is set here the way Ray sets it for that case.

    The cluster's processes learn the cluster's address as RAY_API_SERVER_ADDRESS, which Ray's
    State API clients resolve through the GCS: without it, the PlacementGroupCleaner's client
    looks for the cluster on its machine and fails with a 29-line "Found multiple active Ray
    instances" traceback wherever a second Ray instance runs there (see state_api_env). The
    address is the one this driver uses; a driver must be on the cluster's network anyway."""
    enable_token_auth_if_token_at_hand()
    target = os.environ.get("RAY_ADDRESS", "") if address in (None, "", "auto") else address
    runtime_env = None
    if target and target != "auto" and "://" not in target and not _job_sets_env("RAY_API_SERVER_ADDRESS"):
        runtime_env = {"env_vars": {"RAY_API_SERVER_ADDRESS": target}}
    try:
        ray.init(address=address or None, log_to_driver=True, runtime_env=runtime_env)
    except ConnectionError as exc:
        if "multiple active Ray instances" not in str(exc):
            raise
        raise ConfigError(f"ray.address={address or os.environ.get('RAY_ADDRESS')}: several Ray clusters run on "
                          "this machine; name one, e.g. ray.address=127.0.0.1:6379") from None


def enable_token_auth_if_token_at_hand() -> None:
    """RAY_AUTH_MODE=token, in this process and those it starts, when a token is at hand and no
    mode is set (Ray reads the mode when it is imported: its own helper updates both)."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    with _quiet(_TOKEN_NOTICE_LOGGER):
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _job_sets_env(name: str) -> bool:
    """Whether the Ray job this process drives sets `name` itself (ray.init refuses to merge a
    second value into the job's runtime env)."""
    from fvae_dist.job_paths import JOB_CONFIG_VARIABLE

    raw = os.environ.get(JOB_CONFIG_VARIABLE)
    try:
        return bool(raw) and name in ((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return False


def state_api_env(dashboard_port: int) -> dict[str, str]:
    """Environment of every process of a local cluster: where its State API is.

    Workaround for Ray 2.60: a State API client without an address (the PlacementGroupCleaner's)
    looks for the cluster on the machine, and in a worker process, where RAY_ADDRESS is unset,
    it raises ConnectionError("Found multiple active Ray instances") as soon as a second local
    Ray instance runs on the machine (another `fvae-dist` command, a test). The cleaner catches
    only RayStateApiException, so its monitor thread dies and the placement group stays
    (ray-project/ray PR #54468 describes the same failure to resolve the address; Ray 2.60's
    dashboard/utils.py:ray_address_to_api_server_url does not default to the connected cluster).
    tests/train/test_ray_cluster.py pins the behaviour: drop this when that test says Ray
    resolves the address itself."""
    return {"RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{dashboard_port}", **LOCAL_QUIET_ENV}


def free_local_port() -> int:
    """A port of DASHBOARD_PORT_RANGE nothing listens on at 127.0.0.1 right now."""
    rng = random.Random()
    while True:
        port = rng.randrange(*DASHBOARD_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port


def _init_with_dashboard(num_cpus: int) -> None:
    # The dashboard's port is fixed before ray.init so that state_api_env can name it; Ray would
    # otherwise pick one (8265 or the next free one) only while it starts.
    for attempt in range(START_ATTEMPTS):
        port = free_local_port()
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, dashboard_port=port,
                     _node_ip_address=LOOPBACK, log_to_driver=True, runtime_env={"env_vars": state_api_env(port)})
            return
        except Exception as exc:
            if not _worth_another_start(exc) or attempt == START_ATTEMPTS - 1:
                raise
            ray.shutdown()


def _worth_another_start(exc: Exception) -> bool:
    """Whether a local cluster that failed to start may start on a second try: another process
    took the dashboard's port between the probe and the bind, or the node did not come up in
    time (on a busy machine the raylet gives up when its agents take more than 15 s to start)."""
    text = str(exc)
    return "already occupied" in text or "timed out during startup" in text


@contextmanager
def _loopback_node() -> Iterator[None]:
    """127.0.0.1 as the address of the node ray.init starts (see the module's docstring)."""
    from ray._private import ray_constants

    # this process imported Ray already: its copy of the single-machine setting is changed here,
    # the processes ray.init starts read LOCAL_START_ENV
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environment(LOCAL_START_ENV):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)
