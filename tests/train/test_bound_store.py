"""train/bound_store.py: with install(), rank 0's rendezvous store listens on MASTER_ADDR only
(without it, PyTorch's listens on every interface). A one-process gloo group in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from fvae_dist.train.local_ray import free_local_port

REPO = Path(__file__).resolve().parents[2]

GROUP = textwrap.dedent("""
    import json, os, sys, psutil, torch.distributed as dist
    if sys.argv[1] == "bound":
        from fvae_dist.train.bound_store import install
        install()
    dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
    listening = [c.laddr.ip for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    dist.destroy_process_group()
    print(json.dumps(listening))
""")


def listening_addresses(mode: str) -> list[str]:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_local_port()), "PYTHONPATH": str(REPO),
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", GROUP, mode], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_rendezvous_store_listens_on_the_master_address_only():
    assert set(listening_addresses("bound")) == {"127.0.0.1"}
    # what install() changes (when this fails, PyTorch binds the address itself: drop bound_store)
    assert {"::", "0.0.0.0"} & set(listening_addresses("torch"))
