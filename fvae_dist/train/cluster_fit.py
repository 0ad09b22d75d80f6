"""Whether training runs fit the Ray cluster with a CPU left to Ray Data.

Ray Data's tasks (reading the days, the split coordinator's work) need CPUs that no Train worker
holds: when the workers hold them all, every input pipeline waits forever (2 workers x 1 CPU on
a 2-CPU machine hang at the first batch). `fvae-dist train`, every Tune trial and every grid
trial therefore ask here before they start, with the cluster's per-node resources:

    RunShape.of(cfg)                    what one training run holds
    cluster_nodes()                     the resources of the cluster's live nodes (ray.nodes())
    check_fits(shape, nodes) -> int     how many such runs fit at once; ConfigError naming the
                                        settings when not even one does

Today the rule counts the cluster's totals: all runs together leave RAY_DATA_CPUS CPUs free,
wherever they are placed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from fvae_dist.config import ExperimentConfig
from fvae_dist.errors import ConfigError

# CPUs that running trainings together must leave free for Ray Data.
RAY_DATA_CPUS = 1.0
_EPS = 1e-9


@dataclass(frozen=True)
class RunShape:
    """The resources one training run holds while it runs."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool = False
    driver_cpus: float = 0.0
    """CPUs of the process that drives the run besides its workers (a Tune trial's actor)."""

    settings: str = "ray."
    """Prefix of the settings these numbers come from, for messages ("tune.resources.")."""

    unit: str = "run"
    """What one of them is called in messages ("trial")."""

    @classmethod
    def of(cls, cfg: ExperimentConfig, *, driver_cpus: float = 0.0, unit: str = "run") -> "RunShape":
        return cls(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu, driver_cpus, "ray.", unit)

    @property
    def cpus(self) -> float:
        return self.driver_cpus + self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> int:
        return self.num_workers if self.use_gpu else 0


def cluster_nodes() -> list[dict[str, float]]:
    """The resources (CPU, GPU, memory, ...) of each live node of the connected Ray cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_fits(shape: RunShape, nodes: Sequence[Mapping[str, float]]) -> int:
    """How many runs of `shape` fit on these nodes at once, leaving Ray Data its CPUs (>= 1).
    Raises ConfigError, naming the settings and what to change, when not even one fits."""
    cpus = sum(float(node.get("CPU", 0.0)) for node in nodes)
    gpus = sum(float(node.get("GPU", 0.0)) for node in nodes)
    usable = cpus - RAY_DATA_CPUS
    if shape.cpus > usable + _EPS:
        raise ConfigError(f"one {shape.unit} needs {shape.cpus:g} CPUs ({_breakdown(shape)}), but the Ray cluster "
                          f"has {cpus:g} and Ray Data needs {RAY_DATA_CPUS:g} free; {_cpu_fix(shape, usable)}")
    if shape.gpus > gpus:
        raise ConfigError(f"one {shape.unit} needs {shape.gpus} GPUs ({shape.settings}num_workers="
                          f"{shape.num_workers} with {shape.settings}use_gpu=true), but the Ray cluster has {gpus:g}")
    fit = int((usable + _EPS) // shape.cpus)
    if shape.gpus:
        fit = min(fit, int(gpus // shape.gpus))
    return max(fit, 1)


def _breakdown(shape: RunShape) -> str:
    text = f"{shape.settings}num_workers={shape.num_workers} x {shape.settings}cpus_per_worker={shape.cpus_per_worker:g}"
    return text + (f" + {shape.settings}driver_cpus={shape.driver_cpus:g}" if shape.driver_cpus else "")


def _cpu_fix(shape: RunShape, usable: float) -> str:
    suggestion = (usable - shape.driver_cpus) / shape.num_workers
    if suggestion <= 0:
        return "this cluster is too small: use a machine with at least 2 CPUs"
    return f"use {shape.settings}cpus_per_worker={suggestion:.2g} or fewer workers, or a larger cluster"
