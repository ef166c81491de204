"""Scheduler-side pieces that run on the rank-0 node."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin


def job_of_worker(worker: Any) -> str:
    """The worker-group (job) name of a worker: its name without ``-RANK-INDEX``.

    Module-level so the scheduler can unpickle it as adaptive's ``worker_key``.

    Examples
    --------
    >>> job_of_worker("dask-me-1234-w3-0-1")
    'dask-me-1234-w3'
    """
    name = str(getattr(worker, "name", worker))
    parts = name.rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() else name


class KeepMainJobWorkers(SchedulerPlugin):
    """Never offer the main job's workers for downscaling.

    The main job's nodes run the scheduler and stay for the cluster's life, so
    retiring their workers would only idle paid-for nodes. Adaptive scaling
    therefore closes whole worker jobs only.

    Parameters
    ----------
    main_group
        Worker-group name of the main job (its workers are ``main_group-R-I``).
    """

    name = "dask-amlcompute-keep-main-job"

    def __init__(self, main_group: str) -> None:
        self.main_group = main_group

    def valid_workers_downscaling(self, scheduler: Any, workers: list) -> list:
        return [ws for ws in workers if job_of_worker(ws.name) != self.main_group]
