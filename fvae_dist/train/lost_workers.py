"""One line instead of Ray's traceback when a run ends because the cluster lost its workers.

A Train worker whose process or node dies fails the run once ray.max_failures restarts are used
up, and a restart fails too when the cluster cannot place the worker group within
trainer.WORKER_GROUP_START_ATTEMPTS tries (the lost node held what the others cannot). Ray ends
fit() with a WorkerGroupError or ControllerError of some 100 lines; what the user needs is which
worker went, how far the run got and what to do: rerun the same command once the cluster is
whole again, which resumes from the latest checkpoint.

    lost_workers_error(exc, run_name, epochs_done, epochs, max_failures) -> ClusterError | None
"""
from __future__ import annotations

from fvae_dist.errors import ClusterError, exception_chain

# What Ray (2.60) raises, by class name (several are private), when a worker's process or node is
# gone, or when the worker group cannot be placed or started again.
LOST = {
    "WorkerHealthCheckFailedError", "WorkerHealthCheckTimeoutError",  # ray.train.v2._internal.exceptions
    "ActorDiedError", "ActorUnavailableError", "NodeDiedError", "WorkerCrashedError",  # ray.exceptions
    "WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError", "InsufficientClusterResourcesError",
}


def lost_workers_error(exc: BaseException, run_name: str, epochs_done: int, epochs: int,
                       max_failures: int) -> ClusterError | None:
    """The ClusterError that says it, when `exc` (what fit() raised) is a lost worker's; else None."""
    for failure in exception_chain(exc):
        if type(failure).__name__ in LOST:
            what = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
            restarts = "allows no restart" if max_failures == 0 else "restarts did not bring it back"
            return ClusterError(
                f"{run_name}: training stopped after {epochs_done} of {epochs} epochs because the Ray cluster lost "
                f"a Train worker ({type(failure).__name__}: {what}) and ray.max_failures={max_failures} {restarts}; "
                "rerun the same command once the cluster has its nodes again: it resumes from the latest checkpoint")
    return None
