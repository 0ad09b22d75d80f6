"""train/lost_workers.py: a run that ends because the cluster lost a worker says so in one line
(the Ray side runs in tests/cluster/test_two_nodes.py)."""
from __future__ import annotations

from fvae_dist.errors import ClusterError
from fvae_dist.train.lost_workers import lost_workers_error


class WorkerHealthCheckFailedError(Exception):
    """Named as Ray 2.60's own (ray.train.v2._internal.exceptions)."""


class WorkerGroupError(Exception):
    def __init__(self, failures):
        super().__init__("Training failed due to worker errors: ...")
        self.worker_failures = failures


def test_a_lost_worker_is_one_line_that_says_to_rerun():
    failed = WorkerGroupError({1: WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: ...")})
    error = lost_workers_error(failed, "two", 1, 8, 0)
    assert isinstance(error, ClusterError)
    assert str(error) == ("two: training stopped after 1 of 8 epochs because the Ray cluster lost a Train worker "
                          "(WorkerHealthCheckFailedError: A worker health check failed.) and ray.max_failures=0 allows "
                          "no restart; rerun the same command once the cluster has its nodes again: it resumes from "
                          "the latest checkpoint")
    assert "restarts did not bring it back" in str(lost_workers_error(failed, "two", 1, 8, 2))


def test_other_failures_are_left_to_the_caller():
    assert lost_workers_error(WorkerGroupError({0: ZeroDivisionError("x")}), "two", 1, 8, 0) is None
