"""PyTorch's rendezvous store bound to the address the other ranks are given, not every interface.

Ray Train sets up a run's torch.distributed process group (TorchConfig, init_method env:// or
tcp://): rank 0 hosts a c10d TCPStore at MASTER_ADDR:MASTER_PORT, the rank-0 node's address
(127.0.0.1 on a local cluster), and its server listens on every interface of the machine:
PyTorch takes no address to bind, only an already bound socket (master_listen_fd), which Ray
Train does not pass.

    install()   run in every Train worker process when it starts (Ray's runtime_env
                worker_process_setup_hook): rank 0's store then listens on MASTER_ADDR only

tests/train/test_local_cluster.py sees the store's socket among the cluster's listening ones.
"""
from __future__ import annotations

import socket


def install() -> None:
    from torch.distributed import rendezvous

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
