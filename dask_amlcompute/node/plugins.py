"""Scheduler-side pieces that run on the rank-0 node."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

#: Scheduler handler the cluster manager calls to say it is still there.
HEARTBEAT_HANDLER = "dask_amlcompute_heartbeat"


def worker_job_and_rank(worker: Any) -> tuple[str, str]:
    """(job, rank) of a worker named ``JOB-RANK-INDEX``; (its name, "") for any other name."""
    name = str(getattr(worker, "name", worker))
    match = re.fullmatch(r"(.*)-(\d+)-\d+", name)
    return (match[1], match[2]) if match else (name, "")


def job_of_worker(worker: Any) -> str:
    """The worker-group (job) name of a worker: its name without ``-RANK-INDEX``.

    Module-level so the scheduler can unpickle it as adaptive's ``worker_key``.

    Examples
    --------
    >>> job_of_worker("dask-me-1234-w3-0-1")
    'dask-me-1234-w3'
    """
    return worker_job_and_rank(worker)[0]


def heartbeat(scheduler: Any) -> dict[str, Any]:
    """The :data:`HEARTBEAT_HANDLER` reply: the scheduler's id, each plugin's ``on_heartbeat()``."""
    reply: dict[str, Any] = {"id": scheduler.id}
    for plugin in list(scheduler.plugins.values()):
        reply.update(getattr(plugin, "on_heartbeat", dict)())
    return reply


class KeepMainJobWorkers(SchedulerPlugin):
    """Never offer the main job's workers (``main_group-R-I``) for downscaling.

    The main job's nodes run the scheduler and stay for the cluster's life, so
    adaptive scaling closes whole worker jobs only.
    """

    name = "dask-amlcompute-keep-main-job"

    def __init__(self, main_group: str) -> None:
        self.main_group = main_group

    def valid_workers_downscaling(self, scheduler: Any, workers: list) -> list:
        return [ws for ws in workers if job_of_worker(ws.name) != self.main_group]


class NameTheStop(SchedulerPlugin):
    """Fail the work in flight with the reason AML stops the job, before the scheduler closes.

    AML sends SIGTERM to every node of a job cancelled, past ``job_timeout``, or with a
    node failed or preempted: instead of ``FutureCancelledError: scheduler-connection-lost``,
    :meth:`fail_work` errs every task a client waits for with a ``ClusterLostError`` saying which.

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
        job, rank = worker_job_and_rank(self.names.pop(worker, ""))
        lost = job == self.main_group and rank != "0" and rank not in self.lost_ranks
        if lost and stimulus_id.startswith("handle-worker-cleanup"):
            self.lost_ranks.append(rank)

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


class NoClientTimeout(SchedulerPlugin):
    """Shut the scheduler down when nobody has used it for ``timeout`` seconds.

    "Nobody": no Dask client is connected and the cluster manager sent no heartbeat.
    The backstop for a notebook kernel that died without closing its cluster. The
    clock starts at the first contact (a heartbeat or a client): until then the
    scheduler waits ``first_contact_timeout`` (None: ``timeout``) from its own start,
    as the client may take long to read its address from AML.
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
        self.scheduler = scheduler
        self.last_seen = time.monotonic()
        self._task = asyncio.create_task(self._watch())

    def on_heartbeat(self) -> dict[str, Any]:
        """Record that the cluster manager is alive; the reply names the timeout."""
        self.contacted = True
        self.last_seen = time.monotonic()
        return {"timeout": self.timeout}

    async def _watch(self) -> None:
        interval = max(0.2, min(self.timeout / 5, self.first_contact_timeout / 5, 30.0))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if any(name != "fire-and-forget" for name in self.scheduler.clients):
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
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()


def exception_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes (or contexts), outermost first; each once, so a cycle ends it."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:  # exceptions compare by identity
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


class MissingModules(SchedulerPlugin):
    """Note the modules the nodes lack; the heartbeat's reply names each once.

    A task importing one errs (``No module named 'x'``); a graph holding one of its
    functions fails to unpickle on the scheduler, which logs that while handling the
    error (:meth:`filter` sees it).
    """

    name = "dask-amlcompute-missing-modules"

    def __init__(self) -> None:
        self.found: dict[str, bool] = {}  # module: reported

    async def start(self, scheduler: Any) -> None:
        logging.getLogger("distributed.scheduler").addFilter(self.filter)

    def on_heartbeat(self) -> dict[str, Any]:
        new = [module for module, told in self.found.items() if not told]
        self.found.update(dict.fromkeys(new, True))
        return {"missing_modules": new}

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "erred":
            self.note(str(kwargs.get("exception_text")))

    def filter(self, record: Any) -> bool:
        """A log filter: note the modules of the import errors being handled."""
        for exc in exception_chain(sys.exc_info()[1]):
            self.note(str(exc) if isinstance(exc, ImportError) else "")
        return True

    def note(self, text: str) -> None:
        for module in re.findall(r"No module named '([\w.]+)'", text):
            self.found.setdefault(module, False)

    async def close(self) -> None:
        logging.getLogger("distributed.scheduler").removeFilter(self.filter)
