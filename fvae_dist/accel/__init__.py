"""Optional CPU fast paths, behind one setting: `train.cpu_kernels`.

    "auto"  (default) every path below that applies to the run's device and precision
    "off"   none: training runs models/ and torch exactly as they are
    "gru,allocator", ...  only the paths named (benchmarks and bisecting use this)

Paths (each one's measured gain on the end-to-end training step: docs/benchmarks.md):
    gru         every plain torch.nn.GRU of the built model (FactorVAE's eq. 4, the GRU and GAT
                baselines) becomes an accel.gru.CPUGRU: the same parameters and function, its
                float32 CPU time loop in one C++ extension call per layer (accel/gru_loop.cpp).
                CUDA, bf16/fp16 autocast and anything unusual fall through to nn.GRU.
    allocator   glibc keeps the memory a step frees inside the worker process (accel/memory.py).
    compile     the SFM baseline's time loop through torch.compile (accel/compiled.py): inductor
                fuses its elementwise chain; the same parameters and function.

The seam: models/ never import this package. The trainer calls `prepare_model` on the model it
has built and `worker_env_vars` / `prepare_worker_process` for its worker processes; with "off"
each is the identity. Editing the model (factorvae.py) therefore always changes what trains.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from fvae_dist.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only by the paths themselves: config.py validates with this module
    from torch import nn

PATHS = ("gru", "allocator", "compile")
SETTING = "train.cpu_kernels"


def canonical(setting) -> str:
    """YAML reads a bare `off` as the boolean false (and `on` as true): both mean the words."""
    value = str(setting).strip().lower()
    return {"false": "off", "no": "off", "true": "auto", "on": "auto", "yes": "auto"}.get(value, value)


def enabled_paths(setting: str) -> frozenset[str]:
    """The paths a `train.cpu_kernels` value turns on; ConfigError naming the setting otherwise."""
    value = canonical(setting)
    if value == "auto":
        return frozenset(PATHS)
    if value in ("off", "none", ""):
        return frozenset()
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PATHS]
    if unknown:
        raise ConfigError(f"{SETTING}={setting!r}: expected auto, off or a comma-separated subset of "
                          f"{', '.join(PATHS)}; unknown: {', '.join(unknown)}")
    return frozenset(names)


def prepare_model(model: nn.Module, setting: str, device_type: str = "cpu") -> nn.Module:
    """`model` with the module-swapping paths applied (in place); the identity off the CPU."""
    if device_type == "cpu" and "gru" in enabled_paths(setting):
        from fvae_dist.accel.gru import swap_grus

        swap_grus(model)
    if device_type == "cpu" and "compile" in enabled_paths(setting):
        from fvae_dist.accel.compiled import compile_sfm_loops

        compile_sfm_loops(model)
    return model


def worker_env_vars(setting: str, device_type: str = "cpu") -> dict[str, str]:
    """Environment variables the training worker processes start with."""
    if device_type == "cpu" and "allocator" in enabled_paths(setting):
        from fvae_dist.accel.memory import worker_env_vars as allocator_env

        return allocator_env()
    return {}


def prepare_worker_process(setting: str, device_type: str = "cpu") -> None:
    """Process-wide settings, called once in each training worker before the first step."""
    if device_type == "cpu" and "allocator" in enabled_paths(setting):
        from fvae_dist.accel.memory import keep_freed_memory

        keep_freed_memory()


def build_ahead(setting: str, device_type: str = "cpu") -> None:
    """Compile what the paths need before the workers start (the driver calls this, so workers
    on this node find the build cached instead of each waiting for the compiler)."""
    if device_type == "cpu" and "gru" in enabled_paths(setting):
        from fvae_dist.accel.extension import load_gru_loop

        load_gru_loop()
