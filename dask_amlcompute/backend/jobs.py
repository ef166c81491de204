"""A cluster's AML jobs as Dask ``ProcessInterface`` objects.

- :class:`MainJob`, SpecCluster's "scheduler": submits (or reconnects to) the main job, waits
  for its scheduler's address, connects; then one supervisor decides whether the cluster is
  lost (tunnel, scheduler id, the job list of :mod:`~.watch`); stops the job on close.
- :class:`MainJobWorkers`: the workers beside the scheduler; waits for them to join.
- :class:`WorkerJob`: a worker job of ``scale``/``adapt`` (or found by ``from_name``); on
  close its workers retire (their data moves first), then the job is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from distributed.core import rpc
from distributed.deploy.spec import ProcessInterface

from .._protocol import DASHBOARD_TAG, OPEN, SCHEDULER_ID_TAG, SCHEDULER_TAG, probe
from ..exceptions import ClusterLostError, SchedulerUnreachableError, StartupTimeoutError
from .jobwait import LIKELY_CAUSES, job_error, missing_module_hint, refresh, wait_for_tag
from .ops import TERMINAL_STATUSES as TERMINAL
from .ops import JobInfo
from .state import ClusterContext, Lifecycle, Phases
from .watch import JobWatch

logger = logging.getLogger(__name__)

#: Most seconds between heartbeats (each checks the tunnel and which scheduler answers).
IDENTITY_CHECK_INTERVAL = 5.0
#: The main job going back from a status of ``RAN`` to one of ``NOT_YET_RUNNING`` runs again.
NOT_YET_RUNNING = ("NotStarted", "Starting", "Provisioning", "Queued", "Preparing")
RAN = ("Running", "Finalizing")
#: What a lost cluster means for the user's work, and what to do.
LOST_WORK = (
    "Work in flight is lost: distributed cancels the futures pending on each client "
    "(FutureCancelledError 'scheduler-connection-lost'). The cluster's jobs are cancelled. "
    "Start a new cluster."
)


class MainJob(ProcessInterface):
    """The cluster's main AML job, seen from SpecCluster as its scheduler.

    ``connector`` reaches the published scheduler address (directly or through a tunnel);
    ``attach``: reconnect to the running job (``from_name``) instead of submitting it.
    """

    def __init__(
        self, context: ClusterContext, connector: Any, watch: JobWatch, attach: bool = False
    ) -> None:
        super().__init__()
        self.context = context
        self.connector = connector
        self.watch = watch
        self.attach = attach
        self.job_name = context.main_job
        self.internal_address: str | None = None
        self.dashboard_link: str | None = None
        #: The id of the scheduler the client connected to (``SCHEDULER_ID_TAG``), and of
        #: the one the last heartbeat reached (None: it failed).
        self.scheduler_id: str | None = None
        self._reached: str | None = None
        self._supervisor: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None

    def job(self) -> Any:
        """The job entity this interface submits."""
        s = self.context.settings
        return self.context.build(self.job_name, "cluster", s.n_nodes, s.job_timeout)

    async def start(self) -> None:
        ctx, s, state = self.context, self.context.settings, self.context.state
        state.phases = phases = Phases()
        startup_deadline = phases.started + s.startup_timeout
        if self.attach:
            info = await ctx.ops.get_job(self.job_name)
            if info.terminal:
                raise await job_error(ctx.ops, info, f"Cluster {s.name} has ended ({info.status}).")
            ctx.log(f"Reconnecting to AML job {self.job_name} ({info.status})")
        else:
            ctx.log(
                f"Submitting AML job {self.job_name} to "
                + (f"compute {s.compute!r}" if s.compute else f"serverless {s.instance_type}")
                + f": {s.n_nodes} "
                f"node(s), scheduler on rank 0, {s.processes_per_node} worker process(es) per node"
            )
            info = await ctx.ops.submit(self.job())
            phases.mark("submitted")
            if s.job_timeout:
                state.deadline = time.monotonic() + s.job_timeout
        ctx.note(info)
        if info.studio_url:
            ctx.log(f"Studio: {info.studio_url}")
        try:
            left = max(0.0, startup_deadline - time.monotonic())
            if SCHEDULER_TAG not in info.tags:  # a reconnected job's is there: no second GET
                info = await wait_for_tag(ctx, self.job_name, SCHEDULER_TAG, left, phases)
            startup_deadline += sum(phases.spent.values())  # bounded on their own
            phases.mark("scheduler address")
            self.internal_address = state.scheduler_address = info.tags[SCHEDULER_TAG]
            try:
                self.address, self.dashboard_link = await self.connector.connect(
                    self.job_name, self.internal_address, info.tags.get(DASHBOARD_TAG),
                    startup_deadline,
                )  # fmt: skip
                phases.mark("connected")
                self.scheduler_id = info.tags.get(SCHEDULER_ID_TAG)
                reached = await self._reached_id()
                if self.scheduler_id and reached and reached != self.scheduler_id:
                    raise ClusterLostError(
                        f"The scheduler at {self.internal_address} ({reached}) is not the one AML "
                        f"job {self.job_name} published ({self.scheduler_id}): AML ran the job "
                        "again. The job was cancelled; start a new cluster."
                    )
            except SchedulerUnreachableError:
                await refresh(ctx, self.job_name, "during startup.")  # ended: say why
                raise
        except BaseException:
            if not self.attach:
                await ctx.ops.cancel(self.job_name)
            raise
        ctx.log(f"Scheduler at {self.internal_address} (client uses {self.address})")
        state.lifecycle = Lifecycle.RUNNING
        self.watch.follow(self.job_name, self._job_ended, self._main_update)
        self._supervisor = asyncio.create_task(self._supervise())
        self._heartbeat = asyncio.create_task(self._heartbeats(s.no_client_timeout or math.inf))
        await super().start()

    async def gone(self) -> bool:
        """True if the main job ended or its scheduler is gone (job read if a heartbeat failed)."""
        ctx = self.context
        if self.address is None:
            return True
        if not ctx.main_job_ended() and self._reached is None:
            with suppress(Exception):
                ctx.note(await ctx.ops.get_job(self.job_name))
        return ctx.main_job_ended() or await probe(self.address, 3) != OPEN

    async def _reached_id(self) -> str | None:
        """The id of the scheduler the client's address reaches now (None: no answer)."""
        args = self.context.connection_args
        with suppress(Exception):
            async with rpc(self.address, timeout=10, connection_args=args) as scheduler:
                return (await scheduler.identity()).get("id")
        return None

    async def _supervise(self) -> None:
        """Every ``watch_interval``, look at all of the cluster's jobs until it is lost.

        :meth:`~.watch.JobWatch.poll`: the main job ending or run again is a loss. Warns
        before ``job_timeout``.
        """
        ctx, state = self.context, self.context.state
        timeout = ctx.settings.job_timeout
        warn_before, warned = min(600.0, 0.1 * timeout) if timeout else 0.0, False
        while state.lost_reason is None:
            await asyncio.sleep(ctx.settings.watch_interval)
            left = state.remaining()
            if left is not None and not warned and 0 < left <= warn_before:
                warned = True
                ctx.log(
                    f"The cluster reaches its job_timeout in {left:.0f}s: AML will then end "
                    "its jobs. Save results now or start a new cluster with a longer job_timeout."
                )
            try:
                await self.watch.poll()
            except Exception as exc:  # the control plane may be briefly unavailable
                logger.debug("Listing the jobs of %s failed: %s", ctx.settings.name, exc)

    async def _main_update(self, previous: str | None, info: JobInfo) -> JobInfo:
        """The job watch listed the main job: a status gone back or a new scheduler id is a loss.

        The job list may lag ``GET /jobs/{name}`` (and a NotResponding job may return to
        earlier statuses): one GET confirms and decides. Returns the snapshot to go on with.
        """
        known = self.scheduler_id
        listed_id = info.tags.get(SCHEDULER_ID_TAG)
        new_listed = bool(known and listed_id not in (None, known))
        if not new_listed and not (previous in RAN and info.status in NOT_YET_RUNNING):
            return info
        fresh = await self.context.ops.get_job(self.job_name)
        self.context.note(fresh)
        new_id = fresh.tags.get(SCHEDULER_ID_TAG)
        if previous in RAN and fresh.status in NOT_YET_RUNNING:
            await self._requeued(f"AML job went back from {previous} to {fresh.status}")
        elif new_id and known and new_id != known:
            await self._requeued(f"AML job published a new scheduler ({new_id})")
        else:
            logger.info("The job list showed %s %s, a GET shows %s: the list lags; ignored",
                        self.job_name, info.status, fresh.status)  # fmt: skip
        return fresh

    async def _requeued(self, evidence: str) -> None:
        """The main job runs again (a new scheduler): one wording, whichever ``evidence`` came first."""
        await self._lost(
            f"{evidence}: the rank-0 node of AML job {self.job_name} was preempted and AML "
            "requeued the job to run it again. The new scheduler has none of this cluster's "
            "workers or data."
        )

    async def _lost(self, why: str, cancel: bool = True) -> None:
        """The cluster is gone for good: say why once, close the connection, cancel every job.

        ``cancel=False``: only this object lost the scheduler (``why`` says what to do).
        """
        ctx, state = self.context, self.context.state
        if state.lost_reason is not None or state.closing:
            return
        state.lost_reason = f"{why} {LOST_WORK}" if cancel else why
        logger.warning("Dask cluster %s is lost: %s", ctx.settings.name, state.lost_reason)
        ctx.log(state.lost_reason)
        if self._heartbeat not in (None, asyncio.current_task()):  # keep no new scheduler alive
            self._heartbeat.cancel()
        await self.connector.close()  # a tunnel's local ports close: nothing reaches it
        if not cancel:
            return
        self.watch.followed.clear()  # their ends are no news now
        names = [n for n, status in state.jobs.items() if status not in TERMINAL]
        ended = await asyncio.gather(
            *(ctx.ops.cancel(n, status=state.jobs[n]) for n in names), return_exceptions=True
        )
        for name, status in zip(names, ended, strict=True):
            if isinstance(status, str):
                state.jobs[name] = status

    async def _heartbeats(self, timeout: float) -> None:
        """Tell the scheduler this cluster is alive; warn of modules the nodes lack.

        The cluster is lost once the tunnel gave up or another scheduler answers (no
        control-plane request here: a slow one never delays the keep-alive).
        """
        interval = max(0.2, min(timeout / 4, IDENTITY_CHECK_INTERVAL))
        args = self.context.connection_args
        async with rpc(self.address, timeout=10, connection_args=args) as scheduler:
            while self.context.state.lost_reason is None:  # one rpc: its comm is reused
                if self.connector.failure is not None:
                    return await self._lost(
                        f"The SSH tunnel to the scheduler of AML job {self.job_name} dropped and "
                        f"could not be re-established ({self.connector.failure}): work in flight "
                        "is lost ('scheduler-connection-lost'). The cluster's jobs keep running: "
                        "attach again with AmlComputeCluster.from_name("
                        f"{self.context.settings.name!r}) once the network is back, or close "
                        "this object to cancel them.",
                        cancel=False,
                    )
                try:
                    reply = await scheduler.dask_amlcompute_heartbeat()
                    self._reached = reply.get("id")
                    for module in reply.get("missing_modules", ()):
                        logger.warning(missing_module_hint(module))
                except Exception as exc:
                    self._reached = None
                    logger.debug("Heartbeat to %s failed: %s", self.address, exc)
                if self.scheduler_id and self._reached not in (None, self.scheduler_id):
                    return await self._requeued(f"A different Dask scheduler ({self._reached}) "
                                                f"now answers at {self.internal_address}")  # fmt: skip
                await asyncio.sleep(interval)

    async def _job_ended(self, info: JobInfo) -> None:
        """The main job ended while the cluster ran: name the cause, end the rest."""
        err = str(await job_error(self.context.ops, info, self._end_cause(info)))
        hint = ""
        if "PreemptionError" in err:  # AML's wording for a preempted node
            hint = " A low-priority node was preempted: use a dedicated compute for the main job."
        await self._lost(err.split("\nTail of the node logs:", 1)[0] + hint)
        self.context.state.lost_reason = f"{err}{hint} {LOST_WORK}"  # with the node log tail

    def _end_cause(self, info: JobInfo) -> str:
        """What most likely ended the main job, and what to do about it."""
        s, name, left = self.context.settings, self.job_name, self.context.state.remaining()
        if info.status == "Canceled" and left is not None and left <= s.watch_interval + 5:
            return (
                f"AML job {name} was Canceled: the cluster's job_timeout ({s.job_timeout:.0f} s) "
                "was reached. Start a new cluster with a longer job_timeout."
            )
        if info.status == "Canceled":
            return f"AML job {name} was Canceled outside this cluster object (studio, CLI, SDK)."
        if info.status == "Completed":
            return (
                f"The scheduler of AML job {name} exited and the job Completed (idle_timeout or "
                "no_client_timeout reached, or it was shut down)."
            )
        return f"AML job {name} {info.status}: a node of the main job failed or was lost."

    async def close(self) -> None:
        ctx, jobs, name = self.context, self.context.state.jobs, self.job_name
        for task in (self._supervisor, self._heartbeat):
            if task is not None:
                task.cancel()
        await self.connector.close()  # the scheduler was told to stop already
        if ctx.state.lifecycle is not Lifecycle.DETACHING:  # ours to stop
            # SpecCluster told the scheduler to terminate, but AML can show the job Running
            # a while after: one status read, then a cancel (accepted at once; issue 28)
            if not ctx.main_job_ended():
                with suppress(Exception):
                    ctx.note(await ctx.ops.get_job(name))
            note, known = "", jobs.get(name)
            if not ctx.main_job_ended():
                note = f" (still {known} after its scheduler was told to stop: cancelled)"
                if status := await ctx.ops.cancel(name, wait=False, status=known):
                    jobs[name] = status
            ctx.log(f"AML job {name}: {jobs.get(name)}{note}")
        await super().close()


class _JobWorkers(ProcessInterface):
    """The Dask workers of one AML job: one SpecCluster worker group.

    Workers ``name + suffix`` for each of ``suffixes`` (``-RANK-INDEX``); ``scheduler``: its
    address as the client reaches it.
    """

    def __init__(
        self, scheduler: str, name: str, context: ClusterContext, suffixes: list[str]
    ) -> None:
        super().__init__(scheduler=scheduler, name=name)
        self.scheduler = scheduler
        self.name = name
        self.context = context
        self.worker_names = [f"{name}{suffix}" for suffix in suffixes]
        self.address = name


class MainJobWorkers(_JobWorkers):
    """The workers the main job starts beside the scheduler (they end with it).

    Start waits (bounded by ``startup_timeout``) until all of them joined, then
    compares client, scheduler and worker versions (``version_check``).
    """

    async def start(self) -> None:
        from .versions import check_versions

        ctx, timeout = self.context, self.context.settings.startup_timeout
        deadline = (last_check := time.monotonic()) + timeout
        wanted, joined = set(self.worker_names), set()
        async with rpc(self.scheduler, timeout=5, connection_args=ctx.connection_args) as scheduler:
            while True:
                try:
                    ident = await scheduler.identity()
                    joined = {str(w.get("name")) for w in ident.get("workers", {}).values()}
                except OSError as exc:  # the scheduler went away: the job says why
                    logger.debug("Scheduler not answering: %s", exc)
                    last_check = -math.inf
                if wanted <= joined:
                    break
                now = time.monotonic()
                if now >= deadline or now - last_check >= ctx.settings.poll_interval:
                    last_check = now
                    info = await refresh(ctx, ctx.main_job, "before its workers joined.")
                    if now >= deadline:
                        raise await job_error(
                            ctx.ops,
                            info,
                            f"Workers {', '.join(sorted(wanted - joined))} did not join the "
                            f"scheduler within {timeout:.0f}s (startup_timeout). "
                            + LIKELY_CAUSES.get(info.status, ""),
                            StartupTimeoutError,
                        )
                await asyncio.sleep(0.1)
        ctx.state.phases.mark("workers joined")
        await check_versions(self.scheduler, ctx.connection_args, ctx.settings.version_check)
        await super().start()


class WorkerJob(_JobWorkers):
    """An extra AML worker job: submitted on start, retired and cancelled on close.

    Parameters
    ----------
    scheduler, name, context, suffixes, watch
        As for the other worker groups (``name``: the AML job's); the cluster's job watch.
    on_ended
        Called with ``(name, preempted)`` when the job ends by itself (failure,
        preemption, timeout) or cannot be submitted, so scaling can replace it.
    n_nodes, existing
        Nodes of the job; it already runs (found by ``from_name``): adopt it, submit nothing.
    """

    def __init__(
        self,
        scheduler: str,
        name: str,
        context: ClusterContext,
        suffixes: list[str],
        watch: JobWatch,
        on_ended: Callable[[str, bool], None],
        n_nodes: int = 1,
        existing: bool = False,
    ) -> None:
        super().__init__(scheduler, name, context, suffixes)
        self.watch = watch
        self.on_ended = on_ended
        self.n_nodes = n_nodes
        self._submitted = existing

    async def start(self) -> None:
        if self._submitted or await self._submit():
            self.watch.follow(self.name, self._job_ended)  # one job list for all of them
        await super().start()

    async def _submit(self) -> bool:
        """Submit this worker job (its workers join later: the job may queue for minutes)."""
        ctx, state = self.context, self.context.state
        left = state.remaining()
        if left is not None and left < 60:
            ctx.log(f"Not submitting {self.name}: the cluster's deadline is {left:.0f}s away")
            return False
        timeout = ctx.settings.job_timeout if left is None else left  # not past the deadline
        job = ctx.build(self.name, "workers", self.n_nodes, timeout, state.scheduler_address)
        ctx.log(f"Submitting worker job {self.name}: {self.n_nodes} node(s)")
        try:
            info = await ctx.ops.submit(job)
        except Exception as exc:
            ctx.log(f"Worker job {self.name} could not be submitted: {exc}")
            self.on_ended(self.name, False)
            return False
        ctx.note(info)
        self._submitted = True
        return True

    async def _job_ended(self, info: JobInfo) -> None:
        """The job ended by itself (failure, preemption, timeout): let scaling replace it."""
        ctx = self.context
        why = ""
        if info.status == "Failed":
            err = await job_error(ctx.ops, info, f"Worker job {self.name} failed.")
            if "Preemption" in str(err):  # AML's PreemptionError: a low-priority node was taken
                why = ": preempted (low-priority node); scale/adapt replace it"
        ctx.log(f"Worker job {self.name} ended {info.status}{why}")
        self.on_ended(self.name, bool(why))

    async def close(self) -> None:
        ctx, state = self.context, self.context.state
        self.watch.followed.pop(self.name, None)
        if self._submitted and state.lifecycle is not Lifecycle.DETACHING:
            if not ctx.main_job_ended() and not state.closing:  # closing: no data to keep
                await self._retire()
            if (known := state.jobs.get(self.name)) not in TERMINAL:  # cancelled at exit?
                status = await ctx.ops.cancel(self.name, wait=not state.closing, status=known)
                if status:  # what the cluster's job list shows (the watch follows it no more)
                    state.jobs[self.name] = status
                ctx.log(f"Cancelled worker job {self.name}")
        await super().close()

    async def _retire(self) -> None:
        """Retire this job's workers through the scheduler so their data moves first."""
        try:
            async with rpc(self.scheduler, connection_args=self.context.connection_args) as s:
                await asyncio.wait_for(
                    s.retire_workers(names=self.worker_names, close_workers=True, remove=True),
                    timeout=60,
                )
        except Exception as exc:
            logger.info("Retiring workers of %s: %s", self.name, exc)
