"""Whether training runs fit the Ray cluster, node by node, with a CPU left to Ray Data.

Ray Data's tasks (reading and cutting the days of every split: train each epoch, valid, and test
at the end) need a whole CPU on one node that no Train worker holds: when the workers' placement
leaves no node such a CPU, the input pipeline waits forever (2 workers x 1 CPU on a 2-CPU
machine hang at the first batch; 2 workers x 1.5 CPUs on two 2-CPU nodes, one worker on each,
leave 0.5 CPU per node and hang at the test pass). `fvae-dist train`, every Tune trial and every
grid trial therefore ask here before they start, with the cluster's per-node resources:

    RunShape.of(cfg)                    what one training run holds
    cluster_nodes()                     the resources of the cluster's live nodes (ray.nodes())
    check_fits(shape, nodes) -> int     how many such runs fit at once; ConfigError naming the
                                        settings and what is missing when not even one does

Runs are placed as Ray places them: a run's workers are one placement group with Ray Train's
PACK strategy (as few nodes as possible, the fullest node that still fits first), a Tune trial's
own actor (driver_cpus) on the fullest node that fits it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from fvae_dist.config import ExperimentConfig
from fvae_dist.errors import ConfigError

# CPUs that one node must keep free, after all running trainings are placed, for Ray Data.
RAY_DATA_CPUS = 1.0
# What Ray Data's tasks read, for messages.
SPLITS = "train, valid and test"
_EPS = 1e-9
# Settings suggested are multiples of this.
_STEP = 0.05


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

    def with_cpus_per_worker(self, cpus: float) -> "RunShape":
        return RunShape(self.num_workers, cpus, self.use_gpu, self.driver_cpus, self.settings, self.unit)


def cluster_nodes() -> list[dict[str, float]]:
    """The resources (CPU, GPU, memory, ...) of each live node of the connected Ray cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_fits(shape: RunShape, nodes: Sequence[Mapping[str, float]]) -> int:
    """How many runs of `shape` fit on these nodes at once, placed as Ray places them, with one
    node keeping RAY_DATA_CPUS free (>= 1). Raises ConfigError, naming the settings and what is
    missing, when not even one fits."""
    gpus = sum(float(node.get("GPU", 0.0)) for node in nodes)
    if shape.gpus > gpus + _EPS:
        raise ConfigError(f"one {shape.unit} needs {shape.gpus} GPUs ({shape.settings}num_workers="
                          f"{shape.num_workers} with {shape.settings}use_gpu=true), but the Ray cluster has {gpus:g}")
    free = [_Free.of(node) for node in nodes]
    runs = 0
    while runs < _MAX_RUNS:
        placed = _place(shape, free)
        if placed is None or not _leaves_ray_data(placed):
            break
        free, runs = placed, runs + 1
    if runs == 0:
        raise ConfigError(_why_not(shape, nodes))
    return runs


_MAX_RUNS = 10_000


@dataclass(frozen=True)
class _Free:
    """What is left of one node."""

    cpu: float
    gpu: float

    @classmethod
    def of(cls, node: Mapping[str, float]) -> "_Free":
        return cls(float(node.get("CPU", 0.0)), float(node.get("GPU", 0.0)))

    def holds(self, cpu: float, gpu: float) -> int:
        """How many bundles of (cpu, gpu) fit here."""
        counts = [int((self.cpu + _EPS) // cpu) if cpu > 0 else _MAX_RUNS]
        if gpu > 0:
            counts.append(int((self.gpu + _EPS) // gpu))
        return min(counts)

    def minus(self, cpu: float, gpu: float, count: int = 1) -> "_Free":
        return _Free(self.cpu - count * cpu, self.gpu - count * gpu)


def _place(shape: RunShape, free: list[_Free]) -> list[_Free] | None:
    """The nodes after placing one more run, or None when it does not fit."""
    free = list(free)
    if shape.driver_cpus > 0:
        fits = [i for i, node in enumerate(free) if node.holds(shape.driver_cpus, 0) >= 1]
        if not fits:
            return None
        fullest = min(fits, key=lambda i: free[i].cpu)
        free[fullest] = free[fullest].minus(shape.driver_cpus, 0)
    cpu, gpu = shape.cpus_per_worker, (1.0 if shape.use_gpu else 0.0)
    left = shape.num_workers
    while left:
        # PACK: the node that takes the most of the remaining workers, the fullest among those
        best = max(range(len(free)), key=lambda i: (min(left, free[i].holds(cpu, gpu)), -free[i].cpu), default=None)
        count = 0 if best is None else min(left, free[best].holds(cpu, gpu))
        if count == 0:
            return None
        free[best] = free[best].minus(cpu, gpu, count)
        left -= count
    return free


def _leaves_ray_data(free: Sequence[_Free]) -> bool:
    return any(node.cpu >= RAY_DATA_CPUS - _EPS for node in free)


def _why_not(shape: RunShape, nodes: Sequence[Mapping[str, float]]) -> str:
    cpus = [float(node.get("CPU", 0.0)) for node in nodes]
    total = sum(cpus)
    needs = f"one {shape.unit} needs {shape.cpus:g} CPUs ({_breakdown(shape)})"
    fix = _cpu_fix(shape, nodes)
    if len(nodes) <= 1:
        return (f"{needs}, but the Ray cluster has {total:g} and Ray Data needs {RAY_DATA_CPUS:g} free "
                f"(reading the {SPLITS} days); {fix}")
    layout = f"the Ray cluster's {len(nodes)} nodes have {_per_node(cpus)}"
    placed = _place(shape, [_Free.of(node) for node in nodes])
    if placed is None:
        return f"{needs}, but its workers do not fit on the nodes: {layout}; {fix}"
    most = max(node.cpu for node in placed)
    return (f"{needs}; {layout}, and with its workers placed on them no node keeps the {RAY_DATA_CPUS:g} CPU "
            f"that Ray Data needs for reading the {SPLITS} days (at most {max(most, 0):.2g} left on one node); {fix}")


def _per_node(cpus: Sequence[float]) -> str:
    if len(set(cpus)) == 1:
        return f"{cpus[0]:g} CPUs each"
    return ", ".join(f"{cpu:g}" for cpu in cpus) + " CPUs"


def _breakdown(shape: RunShape) -> str:
    text = f"{shape.settings}num_workers={shape.num_workers} x {shape.settings}cpus_per_worker={shape.cpus_per_worker:g}"
    return text + (f" + {shape.settings}driver_cpus={shape.driver_cpus:g}" if shape.driver_cpus else "")


def _cpu_fix(shape: RunShape, nodes: Sequence[Mapping[str, float]]) -> str:
    """The largest cpus_per_worker (a multiple of _STEP, below the current one) that fits."""
    free = [_Free.of(node) for node in nodes]
    steps = int((shape.cpus_per_worker - _EPS) // _STEP)
    for k in range(steps, 0, -1):
        smaller = shape.with_cpus_per_worker(round(k * _STEP, 2))
        placed = _place(smaller, free)
        if placed is not None and _leaves_ray_data(placed):
            return f"use {shape.settings}cpus_per_worker={smaller.cpus_per_worker:.2g} or fewer workers, or a larger cluster"
    node = "a node" if len(nodes) > 1 else "a machine"
    return f"this cluster is too small: use {node} with at least {RAY_DATA_CPUS + 1:g} CPUs"
