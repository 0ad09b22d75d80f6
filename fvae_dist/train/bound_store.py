"""PyTorch's rendezvous store bound to the address the other ranks are given, not every interface.

Ray Train sets up a run's torch.distributed process group (its TorchConfig backend, init_method
env://): rank 0 hosts a c10d TCPStore at MASTER_ADDR:MASTER_PORT, the rank-0 node's address
(127.0.0.1 on a local cluster), and that store's server listens on every interface of the
machine: PyTorch takes no address to bind, only an already bound socket (master_listen_fd),
which Ray Train does not pass.

    BoundStoreTorchConfig(backend=...)   TorchTrainer's torch_config: before Ray Train sets up
                                         the process group, every worker runs install()
    install()                            rank 0's store then listens on MASTER_ADDR only

Both lean on internals (Ray Train's _TorchBackend, torch's rendezvous._create_c10d_store);
tests/train/test_local_cluster.py sees the store's socket among the cluster's listening ones and
fails when either changes.
"""
from __future__ import annotations

import importlib
import socket
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


def install() -> None:
    """Make this process's rank-0 rendezvous store listen on the master address only."""
    # the module (torch.distributed.rendezvous is also the name of one of its functions)
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = rendezvous._create_c10d_store
    if getattr(original, "binds_master_addr", False):
        return

    def create_c10d_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or rendezvous._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        from torch.distributed import TCPStore

        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        listener = socket.create_server((hostname, port), family=family)
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        multi_tenant=True, use_libuv=use_libuv, master_listen_fd=listener.detach())

    create_c10d_store.binds_master_addr = True
    rendezvous._create_c10d_store = create_c10d_store


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(install)
        super().on_start(worker_group, backend_config)


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """Ray Train's TorchConfig, with rank 0's rendezvous store bound to the master address."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend
