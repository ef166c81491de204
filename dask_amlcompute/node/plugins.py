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


class NameTheStop(SchedulerPlugin):
    """Fail the work in flight with the reason AML stops the job, before the scheduler closes.

    AML stops a job by sending SIGTERM to every node: it was cancelled, it reached
    ``job_timeout``, or another of its nodes failed or was preempted. Without this,
    the scheduler just closes and every client sees distributed's
    ``FutureCancelledError: scheduler-connection-lost``. Instead, :meth:`fail_work`
    errs every task a client still waits for with a
    :class:`~dask_amlcompute.ClusterLostError` naming what this node knows.

    Parameters
    ----------
    main_group
        Worker-group name of the main job (its workers are ``main_group-R-I``).
    job_timeout
        The main job's ``job_timeout`` in seconds (None: none).
    """

    name = "dask-amlcompute-name-the-stop"

    def __init__(self, main_group: str, job_timeout: float | None = None) -> None:
        self.main_group = main_group
        self.job_timeout = job_timeout
        self.names: dict[str, str] = {}
        self.lost_ranks: list[str] = []

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.names[worker] = str(scheduler.workers[worker].name)

    def remove_worker(self, scheduler: Any, worker: str, *, stimulus_id: str, **kw: Any) -> None:
        # "handle-worker-cleanup": the worker's comm broke, it did not say goodbye
        name = self.names.pop(worker, "")
        rank = name.rsplit("-", 2)[-2] if job_of_worker(name) == self.main_group else "0"
        if stimulus_id.startswith("handle-worker-cleanup") and rank != "0":
            self.lost_ranks += [] if rank in self.lost_ranks else [rank]

    def reason(self, job: str, elapsed: float) -> str:
        """Why AML stops ``job``, as far as rank 0 can tell, ``elapsed`` s after it started."""
        timeout = self.job_timeout
        if self.lost_ranks:
            what = (
                f"node rank {', '.join(self.lost_ranks)} failed or was preempted (its workers "
                "left without closing) and AML stops the whole job when one of its nodes ends"
            )
        elif timeout and elapsed >= timeout - max(5.0, 0.02 * timeout):
            what = f"its job_timeout ({timeout:g} s) was reached; pass a longer job_timeout"
        else:
            what = "it was cancelled from outside the cluster, or preempted"
        return (
            f"AML is stopping job {job}: {what}. The work in flight is lost: start a new "
            "cluster and run it again (cluster.ended_reason says what AML recorded)."
        )

    def fail_work(self, scheduler: Any, job: str, started: float) -> int:
        """Err every task a client waits for with :meth:`reason`; returns how many.

        ``started``: ``time.monotonic()`` when this node started.
        """
        import time

        from distributed.protocol import Serialized, serialize

        from ..exceptions import ClusterLostError

        reason = self.reason(job, time.monotonic() - started)
        error = Serialized(*serialize(ClusterLostError(reason)))
        waited = [
            t
            for t in scheduler.tasks.values()
            if t.who_wants and t.state not in ("memory", "erred")
        ]
        for ts in waited:
            scheduler.report({"op": "task-erred", "key": ts.key, "exception": error}, ts=ts)
        return len(waited)


#: Scheduler handler the cluster manager calls to say it is still there.
HEARTBEAT_HANDLER = "dask_amlcompute_heartbeat"


class NoClientTimeout(SchedulerPlugin):
    """Shut the scheduler down when nobody has used it for ``timeout`` seconds.

    "Nobody" means no Dask client is connected and the cluster manager (the
    :class:`~dask_amlcompute.AmlComputeCluster` object) has not sent a heartbeat.
    This is the backstop for a notebook kernel that died without closing its
    cluster: the scheduler stops, every node exits and the AML job completes,
    so AML releases the nodes long before the job timeout.

    The clock starts at the first contact (a heartbeat or a client), not when the
    scheduler starts: between the two, the node publishes its address through AML
    and the client polls for it, which on a busy machine or a slow control plane
    takes longer than a short ``timeout``. Until the first contact the scheduler
    waits ``first_contact_timeout``, counted from its own start: a job whose client
    died while it sat in Queued or Preparing (hours, maybe) ends that long after
    its scheduler starts.

    Parameters
    ----------
    timeout
        Seconds without clients or heartbeats before shutting down.
    first_contact_timeout
        Seconds to wait for the first client or heartbeat after the scheduler
        starts (None: ``timeout``).
    """

    name = "dask-amlcompute-no-client-timeout"

    def __init__(self, timeout: float, first_contact_timeout: float | None = None) -> None:
        self.timeout = timeout
        self.first_contact_timeout = first_contact_timeout or timeout
        self.last_seen = 0.0
        self.contacted = False
        self._task: Any = None
        self._closing: Any = None

    async def start(self, scheduler: Any) -> None:
        import asyncio
        import time

        self.scheduler = scheduler
        self.last_seen = time.monotonic()
        scheduler.handlers[HEARTBEAT_HANDLER] = self.heartbeat
        self._task = asyncio.create_task(self._watch())

    def heartbeat(self) -> float:
        """Record that the cluster manager is alive; returns the timeout."""
        import time

        self.contacted = True
        self.last_seen = time.monotonic()
        return self.timeout

    def has_clients(self) -> bool:
        """True if a Dask client is connected."""
        return any(name != "fire-and-forget" for name in self.scheduler.clients)

    async def _watch(self) -> None:
        import asyncio
        import logging
        import time

        interval = max(0.2, min(self.timeout / 5, self.first_contact_timeout / 5, 30.0))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if self.has_clients():
                self.contacted = True
                self.last_seen = now
                continue
            limit = self.timeout if self.contacted else self.first_contact_timeout
            if now - self.last_seen > limit:
                logging.getLogger(__name__).warning(
                    "No client and no cluster manager for %.0fs%s: shutting the scheduler down",
                    limit,
                    "" if self.contacted else " since the scheduler started",
                )
                # close from another task: Scheduler.close() closes this plugin too
                self._closing = asyncio.create_task(
                    self.scheduler.close(reason="dask-amlcompute-no-client-timeout")
                )
                return

    async def close(self) -> None:
        import asyncio

        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()


class MissingModules(SchedulerPlugin):
    """Note the modules the nodes lack; the heartbeat's reply names each once.

    A task importing one errs (``No module named 'x'``); a graph holding one of its
    functions fails to unpickle on the scheduler, which logs that while handling the
    error (:meth:`filter` sees it). Register after :class:`NoClientTimeout`: this wraps
    its heartbeat handler.
    """

    name = "dask-amlcompute-missing-modules"

    def __init__(self) -> None:
        self.found: dict[str, bool] = {}  # module: reported

    async def start(self, scheduler: Any) -> None:
        import logging

        beat = scheduler.handlers.get(HEARTBEAT_HANDLER)

        def heartbeat() -> dict[str, Any]:
            new = [module for module, told in self.found.items() if not told]
            self.found.update(dict.fromkeys(new, True))
            return {"timeout": beat() if beat else None, "missing_modules": new}

        scheduler.handlers[HEARTBEAT_HANDLER] = heartbeat
        logging.getLogger("distributed.scheduler").addFilter(self.filter)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "erred":
            self.note(str(kwargs.get("exception_text")))

    def filter(self, record: Any) -> bool:
        """A log filter: note the modules of the import errors being handled."""
        import sys

        exc = sys.exc_info()[1]
        while exc is not None:
            self.note(str(exc) if isinstance(exc, ImportError) else "")
            exc = exc.__cause__ or exc.__context__
        return True

    def note(self, text: str) -> None:
        import re

        for module in re.findall(r"No module named '([\w.]+)'", text):
            self.found.setdefault(module, False)

    async def close(self) -> None:
        import logging

        logging.getLogger("distributed.scheduler").removeFilter(self.filter)
