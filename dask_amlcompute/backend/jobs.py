"""AML jobs as Dask ``ProcessInterface`` objects.

:class:`AmlSchedulerJob` submits the cluster's main job (scheduler on rank 0,
workers on the other ranks) and becomes the scheduler's address once the job
has published it. :class:`AmlJobWorkers` stands for the workers of one job as a
SpecCluster worker *group*: for the main job it only waits for its workers; for
an extra worker job it submits the job and, on close, retires the job's workers
through the scheduler before cancelling the job so AML releases its nodes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distributed.core import rpc
from distributed.deploy.spec import ProcessInterface

from .._protocol import DASHBOARD_TAG, SCHEDULER_TAG, NodeOptions
from ..config import ClusterSettings
from ..exceptions import SchedulerUnreachableError, StartupTimeoutError
from .jobspec import build_job
from .jobwait import LIKELY_CAUSES, job_error, wait_for_tag
from .ops import TERMINAL_STATUSES, AmlOps, ComputeInfo

logger = logging.getLogger(__name__)


@dataclass
class ClusterContext:
    """State shared by a cluster and the ProcessInterfaces it creates."""

    settings: ClusterSettings
    ops: AmlOps
    log: Callable[[str], None]
    environment: Any = None
    compute: ComputeInfo | None = None
    connection_args: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)  # job name -> last known status
    closing: bool = False
    ended_reason: str | None = None
    connector: Any = None
    scheduler_internal_address: str | None = None
    deadline: float | None = None  # time.monotonic() when the cluster's job_timeout runs out
    on_job_ended: Callable[[str, str], None] | None = None

    main_job: str | None = None
    secret_env: dict[str, str] = field(default_factory=dict)  # e.g. TLS material for the nodes
    attach: bool = False  # reconnecting to a running cluster (from_name): submit nothing
    detaching: bool = False  # closing a cluster object that does not own the cluster
    #: startup phase -> seconds since the main job's submission began (see ``mark``)
    phases: dict[str, float] = field(default_factory=dict)
    started_at: float | None = None

    def main_job_ended(self) -> bool:
        """True once the main job (hence the scheduler) is known to have ended."""
        status = self.jobs.get(self.main_job or "")
        return status in TERMINAL_STATUSES or status == "Finalizing"

    def mark(self, phase: str) -> None:
        """Record when a startup phase was first reached (seconds since submission began)."""
        if self.started_at is not None:
            self.phases.setdefault(phase, round(time.monotonic() - self.started_at, 3))

    def remaining(self) -> float | None:
        """Seconds left before the cluster's deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    def node_options(self, role: str, prefix: str, scheduler_address: str | None = None):
        """Node entrypoint options for a job of this cluster."""
        s = self.settings
        return NodeOptions(
            role=role,
            name_prefix=prefix,
            processes=s.processes_per_node,
            threads=s.threads_per_process,
            memory_limit=s.memory_limit,
            scheduler_port=s.scheduler_port,
            dashboard_port=s.dashboard_port,
            worker_on_scheduler=s.worker_on_scheduler,
            death_timeout=s.death_timeout,
            idle_timeout=s.idle_timeout,
            no_client_timeout=s.no_client_timeout,
            # the client may take up to its startup bound to find and reach the scheduler
            first_contact_timeout=s.startup_timeout if s.no_client_timeout else None,
            scheduler_address=scheduler_address,
            scheduler_options=s.scheduler_options,
            worker_options=s.worker_options,
        )

    def build(
        self, job_name: str, role: str, n_nodes: int, node: NodeOptions, timeout: float | None
    ):
        """The AML job entity for one of this cluster's jobs."""
        s = self.settings
        return build_job(
            name=job_name,
            compute=s.compute,
            n_nodes=n_nodes,
            node=node,
            environment=self.environment,
            experiment_name=s.experiment_name,
            timeout_seconds=timeout,
            cluster_name=s.name,
            tags=s.tags,
            env_vars={**s.env_vars, **self.secret_env},
            distribution=s.distribution,
        )


class AmlSchedulerJob(ProcessInterface):
    """The cluster's main AML job, seen from SpecCluster as its scheduler.

    Parameters
    ----------
    context
        Shared cluster state.
    job_name
        Name of the main AML job.
    """

    def __init__(self, context: ClusterContext, job_name: str) -> None:
        super().__init__()
        self.context = context
        self.job_name = job_name
        self.internal_address: str | None = None
        self.dashboard_link: str | None = None
        self._watcher: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None

    def job(self):
        """The job entity this interface submits."""
        s = self.context.settings
        node = self.context.node_options("cluster", f"{s.name}-main")
        return self.context.build(self.job_name, "cluster", s.n_nodes, node, s.job_timeout)

    async def start(self) -> None:
        ctx, s = self.context, self.context.settings
        ctx.started_at = time.monotonic()
        startup_deadline = ctx.started_at + s.startup_timeout
        if ctx.attach:
            info = await ctx.ops.get_job(self.job_name)
            if info.terminal:
                raise await job_error(ctx, info, f"Cluster {s.name} has ended ({info.status}).")
            ctx.log(f"Reconnecting to AML job {self.job_name} ({info.status})")
        else:
            ctx.log(
                f"Submitting AML job {self.job_name} to compute {s.compute!r}: {s.n_nodes} "
                f"node(s), scheduler on rank 0, {s.processes_per_node} worker process(es) per node"
            )
            info = await ctx.ops.submit(self.job())
            ctx.mark("submitted")
            if info.environment and not isinstance(ctx.environment, str):
                # worker jobs name the environment AML registered: no re-upload per job
                ctx.environment = info.environment
            if s.job_timeout:
                ctx.deadline = time.monotonic() + s.job_timeout
        ctx.jobs[self.job_name] = info.status
        if info.studio_url:
            ctx.log(f"Studio: {info.studio_url}")
        try:
            info = await wait_for_tag(
                ctx, self.job_name, SCHEDULER_TAG, max(0.0, startup_deadline - time.monotonic())
            )
            ctx.mark("scheduler address")
            self.internal_address = info.tags[SCHEDULER_TAG]
            ctx.scheduler_internal_address = self.internal_address
            dashboard = info.tags.get(DASHBOARD_TAG)
            try:
                self.address, self.dashboard_link = await ctx.connector.connect(
                    self.job_name, self.internal_address, dashboard, startup_deadline
                )
                ctx.mark("connected")
            except SchedulerUnreachableError:
                info = await ctx.ops.get_job(self.job_name)
                ctx.jobs[self.job_name] = info.status
                if info.terminal:  # the scheduler did not stay up: say why
                    raise await job_error(
                        ctx, info, f"AML job {self.job_name} ended {info.status} during startup."
                    ) from None
                raise
        except BaseException:
            if not ctx.attach:
                await ctx.ops.cancel(self.job_name)
            raise
        ctx.log(f"Scheduler at {self.internal_address} (client uses {self.address})")
        self._watcher = asyncio.create_task(self._watch())
        if s.no_client_timeout:
            self._heartbeat = asyncio.create_task(self._heartbeats(s.no_client_timeout))
        await super().start()

    async def _heartbeats(self, timeout: float) -> None:
        """Tell the scheduler this cluster object is alive (see ``NoClientTimeout``)."""
        interval = max(0.2, min(timeout / 4, self.context.settings.watch_interval))
        while True:
            try:
                async with rpc(
                    self.address, timeout=10, connection_args=self.context.connection_args
                ) as scheduler:
                    await scheduler.dask_amlcompute_heartbeat()
            except Exception as exc:
                logger.debug("Heartbeat to %s failed: %s", self.address, exc)
            await asyncio.sleep(interval)

    async def _watch(self) -> None:
        """Notice when the main job ends while the cluster runs (timeout, node failure)."""
        ctx = self.context
        interval = ctx.settings.watch_interval
        timeout = ctx.settings.job_timeout
        warn_before = min(600.0, 0.1 * timeout) if timeout else 0.0
        warned = False
        while True:
            await asyncio.sleep(interval)
            left = ctx.remaining()
            if left is not None and not warned and 0 < left <= warn_before:
                warned = True
                ctx.log(
                    f"The cluster reaches its job_timeout in {left:.0f}s: AML will then end "
                    "its jobs. Save results now or start a new cluster with a longer job_timeout."
                )
            try:
                info = await self.context.ops.get_job(self.job_name)
            except Exception as exc:  # the control plane may be briefly unavailable
                logger.debug("Polling %s failed: %s", self.job_name, exc)
                continue
            self.context.jobs[self.job_name] = info.status
            if info.terminal or info.status == "Finalizing":
                if not self.context.closing:
                    err = await job_error(
                        self.context, info, f"The cluster's AML job ended: {info.status}."
                    )
                    self.context.ended_reason = str(err)
                    self.context.log(str(err))
                return

    async def close(self) -> None:
        ctx = self.context
        ctx.closing = True
        for task in (self._watcher, self._heartbeat):
            if task is not None:
                task.cancel()
        if ctx.detaching:  # not ours to stop: just disconnect
            await ctx.connector.close()
            await super().close()
            return
        # SpecCluster has asked the scheduler to terminate: the nodes exit and the job
        # completes by itself. Give it a bounded moment, then cancel to be sure.
        deadline = time.monotonic() + 15
        delay = 0.5
        while time.monotonic() < deadline:
            try:
                info = await ctx.ops.get_job(self.job_name)
            except Exception:
                break
            ctx.jobs[self.job_name] = info.status
            if info.terminal or info.status == "Finalizing":
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 3.0)  # few requests: AML takes a while to notice
        if ctx.jobs.get(self.job_name) not in ("Completed", "Failed", "Canceled", "Finalizing"):
            await ctx.ops.cancel(self.job_name)
        await ctx.connector.close()
        ctx.log(f"AML job {self.job_name}: {ctx.jobs.get(self.job_name)}")
        await super().close()


async def worker_names(address: str, connection_args: dict) -> set[str]:
    """Names of the workers connected to the scheduler at ``address``."""
    async with rpc(address, timeout=5, connection_args=connection_args) as scheduler:
        ident = await scheduler.identity()
    return {str(w.get("name")) for w in ident.get("workers", {}).values()}


class AmlJobWorkers(ProcessInterface):
    """The Dask workers of one AML job: one SpecCluster worker group.

    Parameters
    ----------
    scheduler
        Address of the scheduler (as the client reaches it).
    name
        Group name; the job's workers are called ``name + suffix``.
    context
        Shared cluster state.
    suffixes
        Worker name suffixes (``-RANK-INDEX``).
    job_name
        The AML job running these workers (default: ``name``).
    n_nodes
        Nodes of the job (for a worker job it submits).
    submit
        False for the main job's workers (the scheduler's job runs them); True
        for an extra worker job that this object submits and cancels.
    owns_job
        Cancel the job on close (default: ``submit``); True for a worker job
        found by ``from_name``.
    """

    def __init__(
        self,
        scheduler: str,
        name: str,
        context: ClusterContext,
        suffixes: list[str],
        job_name: str | None = None,
        n_nodes: int = 1,
        submit: bool = False,
        scheduler_internal_address: str | None = None,
        owns_job: bool | None = None,
    ) -> None:
        super().__init__(scheduler=scheduler, name=name)
        self.scheduler = scheduler
        self.name = name
        self.context = context
        self.job_name = job_name or name
        self.worker_names = [f"{name}{suffix}" for suffix in suffixes]
        self.n_nodes = n_nodes
        self.submit = submit
        self.owns_job = submit if owns_job is None else owns_job
        self.scheduler_internal_address = scheduler_internal_address
        self.address = self.job_name
        self._monitor: asyncio.Task | None = None

    async def start(self) -> None:
        if self.submit:
            await self._submit()
        elif self.owns_job:  # an existing worker job found by from_name
            self._monitor = asyncio.create_task(self._watch())
        else:
            await self._wait_for_workers()
            self.context.mark("workers joined")
            await self._check_versions()
        await super().start()

    async def _check_versions(self) -> None:
        """Client vs scheduler vs workers: the packages that must match (``version_check``)."""
        from .versions import check_versions

        await check_versions(
            self.scheduler, self.context.connection_args, self.context.settings.version_check
        )

    async def _submit(self) -> None:
        """Submit this worker job; its workers join later (the job may queue for minutes)."""
        ctx = self.context
        left = ctx.remaining()
        timeout = ctx.settings.job_timeout
        if left is not None:
            if left < 60:
                ctx.log(
                    f"Not submitting {self.job_name}: the cluster's deadline is {left:.0f}s away"
                )
                self._monitor = None
                return
            timeout = left  # never outlive the cluster's deadline
        address = self.scheduler_internal_address or ctx.scheduler_internal_address
        node = ctx.node_options("workers", self.name, address)
        job = ctx.build(self.job_name, "workers", self.n_nodes, node, timeout)
        ctx.log(f"Submitting worker job {self.job_name}: {self.n_nodes} node(s)")
        try:
            info = await ctx.ops.submit(job)
        except Exception as exc:
            ctx.log(f"Worker job {self.job_name} could not be submitted: {exc}")
            if ctx.on_job_ended is not None:
                ctx.on_job_ended(self.name, "NotSubmitted")
            return
        ctx.jobs[self.job_name] = info.status
        self._monitor = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Follow the worker job; report when it ends by itself (failure, preemption, timeout)."""
        ctx = self.context
        interval = ctx.settings.watch_interval
        while True:
            await asyncio.sleep(interval)
            try:
                info = await ctx.ops.get_job(self.job_name)
            except Exception as exc:
                logger.debug("Polling %s failed: %s", self.job_name, exc)
                continue
            if info.status != ctx.jobs.get(self.job_name) and info.status == "Queued":
                ctx.log(f"Worker job {self.job_name} is queued: the compute has no free nodes")
            ctx.jobs[self.job_name] = info.status
            if info.terminal:
                if not ctx.closing:
                    ctx.log(f"Worker job {self.job_name} ended {info.status}")
                    if ctx.on_job_ended is not None:
                        ctx.on_job_ended(self.name, info.status)
                return

    async def _wait_for_workers(self) -> None:
        ctx = self.context
        timeout = ctx.settings.startup_timeout
        deadline = time.monotonic() + timeout
        wanted = set(self.worker_names)
        last_check = time.monotonic()
        joined: set[str] = set()
        while True:
            try:
                joined = await worker_names(self.scheduler, ctx.connection_args)
            except OSError as exc:  # the scheduler went away: the job says why
                logger.debug("Scheduler not answering: %s", exc)
                last_check = -math.inf
            if wanted <= joined:
                return
            now = time.monotonic()
            if now - last_check >= ctx.settings.poll_interval:
                last_check = now
                info = await ctx.ops.get_job(self.job_name)
                ctx.jobs[self.job_name] = info.status
                if info.terminal:
                    raise await job_error(
                        ctx, info, f"AML job {self.job_name} ended before its workers joined."
                    )
            if now >= deadline:
                info = await ctx.ops.get_job(self.job_name)
                missing = ", ".join(sorted(wanted - joined))
                raise await job_error(
                    ctx,
                    info,
                    f"Workers {missing} did not join the scheduler within {timeout:.0f}s "
                    f"(startup_timeout). {LIKELY_CAUSES.get(info.status, '')}",
                    StartupTimeoutError,
                )
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        ctx = self.context
        if self._monitor is not None:
            self._monitor.cancel()
        if ctx.detaching:
            await super().close()
            return
        if (self.owns_job or not ctx.closing) and not ctx.main_job_ended():
            await self._retire()
        if self.owns_job:
            await ctx.ops.cancel(self.job_name)
            ctx.log(f"Cancelled worker job {self.job_name}")
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
            logger.info("Retiring workers of %s: %s", self.job_name, exc)
