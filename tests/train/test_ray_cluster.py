"""The local Ray cluster that `fvae-dist` starts (train.trainer.ensure_ray): with its dashboard,
so that Ray's State API answers, and with that API's address in every process's environment.

The second test pins the Ray 2.60 behaviour that the address works around: in a worker process,
a State API client without an address (as Ray Train's PlacementGroupCleaner makes it) cannot
tell its own cluster from another local one and raises ConnectionError. When that assertion
fails, Ray resolves the address itself and train.local_ray.state_api_env can go."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

OTHER_INSTANCE = textwrap.dedent("""
    import sys, ray
    ray.init(num_cpus=1, include_dashboard=False)
    print("READY", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    ray.shutdown()
""")

PROBE = textwrap.dedent("""
    import json, ray
    from fvae_dist.config import load_config
    from fvae_dist.train.trainer import ensure_ray

    ensure_ray(load_config(None, ["ray.num_cpus=1"]))

    @ray.remote(num_cpus=0)
    class Cleaner:  # asks what Ray Train's PlacementGroupCleaner asks, from a detached actor
        def ask(self, actor_id):
            from ray.train.v2._internal.state.util import is_actor_alive
            try:
                return {"alive": bool(is_actor_alive(actor_id=actor_id, timeout=30))}
            except Exception as exc:
                return {"error": type(exc).__name__, "message": str(exc)[:200]}

    @ray.remote(num_cpus=0)
    class Controller:
        def actor_id(self):
            return ray.get_runtime_context().get_actor_id()

    controller = Controller.remote()
    actor_id = ray.get(controller.actor_id.remote())
    with_address = Cleaner.options(lifetime="detached").remote()
    # the same, with the address ensure_ray puts in the environment taken away again
    without = Cleaner.options(lifetime="detached", runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": ""}}).remote()
    print("RESULT", json.dumps({"with": ray.get(with_address.ask.remote(actor_id)),
                                "without": ray.get(without.ask.remote(actor_id))}))
    ray.shutdown()
""")


def _environment() -> dict[str, str]:
    # RAY_ADDRESS would make ensure_ray join that cluster instead of starting its own
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_state_api_finds_the_cluster_beside_another_local_ray_instance():
    other = subprocess.Popen([sys.executable, "-c", OTHER_INSTANCE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=_environment())
    try:
        assert other.stdout.readline().strip() == "READY"
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                               env=_environment())
    finally:
        other.stdin.close()
        other.wait(timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    line = next(line for line in probe.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    # ensure_ray's cluster: its dashboard answers the cleaner's question (the controller is alive)
    assert result["with"] == {"alive": True}, result
    # Ray 2.60 on its own: two local instances, no address -> the error the cleaner does not catch
    assert result["without"]["error"] == "ConnectionError", result
    assert "multiple active Ray instances" in result["without"]["message"]
