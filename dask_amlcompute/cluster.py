"""``AmlComputeCluster``: a Dask cluster on an Azure ML compute cluster."""

from __future__ import annotations

import asyncio
import html
import logging
import os
import uuid
from dataclasses import replace
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from tornado.ioloop import IOLoop

from .backend import reaper
from .backend.jobs import MainJob
from .backend.jobwait import failed_error
from .backend.ops import AmlOps
from .backend.plan import COMPUTE_TIMEOUT, LOOKUP_TIMEOUT, draft_plan, plan_cluster
from .backend.state import ClusterContext, ClusterState, Lifecycle
from .backend.watch import JobWatch
from .backend.workspace import ml_client_from_config, with_cached_compute, workspace_client
from .config import check_arguments, checked, resolve_settings
from .connect import SchedulerConnector, temporary_tls
from .discovery import describe_cluster, describe_cluster_async, list_cluster_jobs_async
from .exceptions import AmlComputeError, ConfigurationError, WorkspaceNotConfiguredError
from .scaling import ScalingMixin

logger = logging.getLogger(__name__)

#: What :meth:`AmlComputeCluster.job_spec` shows in place of the TLS credentials.
SECRET_IN_JOB_BODY = (
    "<secret, not shown here: the submitted job body holds it in plain text, "
    "readable by everyone who can read the workspace's jobs>"
)


def _check_arguments(loop: Any = None, **flags: Any) -> None:
    """Refuse flags that are not True/False and a ``loop`` that is not a tornado IOLoop."""
    for what, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigurationError(f"{what} must be True or False, got {value!r}.")
    if not isinstance(loop, IOLoop | None):
        raise ConfigurationError(f"loop must be a tornado IOLoop or None, got {loop!r}.")


class AmlComputeCluster(ScalingMixin, SpecCluster):
    """A Dask cluster running as an AML command job on an AmlCompute cluster.

    One AML job of ``n_nodes`` nodes: rank 0 runs the Dask scheduler (and, by default,
    workers), the other ranks ``processes_per_node`` workers each. ``scale``/``adapt``
    add worker jobs.

    Every argument left as None is read from dask config (``amlcompute.*``,
    e.g. ``DASK_AMLCOMPUTE__COMPUTE``), falling back to the package defaults.

    Parameters
    ----------
    ml_client
        An ``azure.ai.ml.MLClient``. None: one from a workspace ``config.json``
        (``workspace_config``, or the current folder and its parents).
    compute
        Name of the AmlCompute target.
    n_nodes
        Nodes of the main job; rank 0 runs the scheduler.
    processes_per_node
        Dask worker processes on each node.
    threads_per_process
        Threads per worker process (default: the node's cores / processes).
    memory_limit
        Memory limit per worker process (default ``"auto"``).
    environment
        None: pinned to the client's Python and packages; ``"name@latest"``,
        ``"name:version"``, a Docker image, or an ``Environment``.
    job_timeout
        AML job time limit (``"2h"``, ``"PT90M"``, seconds): the server-side backstop.
    experiment_name
        AML experiment the jobs are filed under.
    name
        Cluster name (default ``dask-{user}-{random}``); the main job is ``{name}-main``.
    tags, env_vars
        Extra job tags and node environment variables.
    scheduler_options, worker_options
        Extra keyword arguments for the Dask scheduler and workers on the nodes.
    connect
        How the client reaches the scheduler: ``"direct"`` (on the compute's VNet),
        ``"job-ssh"`` (the main job's SSH service through AML's proxy, a stock workspace),
        ``"ssh"`` (the node's public SSH endpoint), or ``"auto"`` (default): the first that works.
    startup_timeout
        Bound on waiting for the job to run and its workers to join.
    code
        A folder of your own modules: the nodes' working directory, shipped in the jobs'
        code snapshot (``.amlignore``/``.gitignore`` apply, size-limited); re-send changed
        code to a running cluster with :func:`~dask_amlcompute.ship_code`.
    credential
        Azure credential for the ``MLClient`` built when none is given, and for AML's
        job-service proxy (default: the ``MLClient``'s).
    asynchronous, loop, shutdown_on_close
        As for every Dask cluster manager.
    create_compute
        (keyword) ``{"size": "Standard_D4s_v3", "max_nodes": 8, "tier": "low_priority",
        "idle_time_before_scale_down": "2m"}``: create ``compute`` (0 nodes at rest) when it
        does not exist, after checking the size and quota; an existing compute is used as it is.
    delete_compute_on_close
        (keyword) Delete the compute when the cluster closes, if this cluster created it.
    **kwargs
        Any other setting of :class:`~dask_amlcompute.config.ClusterSettings`
        (``distribution``, ``worker_on_scheduler``, ``idle_timeout``, ``quiet``, ...).

    Examples
    --------
    >>> from dask.distributed import Client
    >>> cluster = AmlComputeCluster(ml_client, compute="cpu-cluster", n_nodes=4,
    ...                             job_timeout="2h")  # doctest: +SKIP
    >>> client = Client(cluster)  # doctest: +SKIP

    See Also
    --------
    aml_emulator.Emulator : run all of this locally, without Azure.
    """

    def __init__(
        self,
        ml_client: Any = None,
        compute: str | None = None,
        n_nodes: int | None = None,
        processes_per_node: int | None = None,
        threads_per_process: int | None = None,
        memory_limit: str | int | None = None,
        environment: Any = None,
        job_timeout: str | float | None = None,
        experiment_name: str | None = None,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        env_vars: dict[str, str] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        worker_options: dict[str, Any] | None = None,
        connect: str | None = None,
        startup_timeout: str | float | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        shutdown_on_close: bool = True,
        code: str | os.PathLike | None = None,
        credential: Any = None,
        _attach: bool = False,
        _existing_worker_jobs: tuple[tuple[str, int], ...] = (),
        **kwargs: Any,
    ) -> None:
        settings = self.settings = with_cached_compute(resolve_settings(
            compute=compute, n_nodes=n_nodes, processes_per_node=processes_per_node,
            threads_per_process=threads_per_process, memory_limit=memory_limit,
            environment=environment, job_timeout=job_timeout, experiment_name=experiment_name,
            name=name, tags=tags, env_vars=env_vars, scheduler_options=scheduler_options,
            worker_options=worker_options, connect=connect, startup_timeout=startup_timeout,
            **kwargs,
        ))  # fmt: skip
        _check_arguments(asynchronous=asynchronous, shutdown_on_close=shutdown_on_close, loop=loop)
        self.ml_client = workspace_client(ml_client, settings.workspace_config, credential)
        self._quiet = settings.quiet
        security, secret_env = temporary_tls(settings)
        # nothing of the workspace yet: plan_cluster completes the plan in _start
        plan = draft_plan(settings, code, "attach" if _attach else "create")
        ctx = self._context = ClusterContext(
            settings=settings, ops=AmlOps(self.ml_client), state=ClusterState(plan), log=self._log,
            connection_args=security.get_connection_args("client") if security else {},
            secret_env=secret_env, credential=credential,
        )  # fmt: skip
        self._connector = SchedulerConnector(ctx)
        self._watch = JobWatch(ctx)
        self.main_job_name = ctx.main_job
        # a reconnected object names its worker jobs in a series of its own (never reused)
        self._job_series = uuid.uuid4().hex[:6] if _attach else ""
        self._existing_worker_jobs = _existing_worker_jobs  # adopted in _build_worker_specs
        self._main_workers = self._workers_per_job = 0  # set once from the plan in _start
        # jobs this object owns are cancelled however the process ends (close() releases them)
        self._reaper_key = (
            reaper.own(self, self.ml_client, ctx.state.jobs) if shutdown_on_close else None
        )
        main = {"context": ctx, "connector": self._connector, "watch": self._watch}
        try:
            super().__init__(
                scheduler={"cls": MainJob, "options": {**main, "attach": _attach}},
                asynchronous=asynchronous, loop=loop, security=security, name=settings.name,
                shutdown_on_close=shutdown_on_close,
            )  # fmt: skip
        except BaseException:
            runner = getattr(self, "_loop_runner", None)
            if runner is not None and not asynchronous:
                runner.stop()
            raise

    # distributed annotates SpecCluster.from_name as returning a ProcessInterface: it is a cluster
    @classmethod
    def from_name(  # type: ignore[override]
        cls,
        name: str,
        ml_client: Any = None,
        *,
        shutdown_on_close: bool = False,
        asynchronous: bool = False,
        **kwargs: Any,
    ) -> AmlComputeCluster:
        """Reconnect to a running cluster by its name (its settings come from the main job).

        By default the new object does not own the cluster: closing it only disconnects.

        Parameters
        ----------
        name
            The cluster name (its main job is ``{name}-main``).
        ml_client
            An ``MLClient``; None reads the workspace config file.
        shutdown_on_close
            True to stop the cluster when this object closes.
        asynchronous
            True returns an awaitable: ``cluster = await AmlComputeCluster.from_name(name,
            asynchronous=True)``; the AML lookups do not block the event loop.
        **kwargs
            Settings to override, e.g. ``connect="ssh"``, ``ssh_key=...``.

        Examples
        --------
        >>> cluster = AmlComputeCluster.from_name("dask-me-1a2b3c4d")  # doctest: +SKIP
        """
        if name is None:
            raise ConfigurationError("from_name needs the name of a running cluster, got None.")
        checked("name", name)
        check_arguments(
            {k: v for k, v in kwargs.items() if k not in ("loop", "code", "credential")}
        )
        _check_arguments(asynchronous=asynchronous, shutdown_on_close=shutdown_on_close)
        ml_client = workspace_client(ml_client, kwargs.get("workspace_config"))

        def attach(found: dict[str, Any]) -> AmlComputeCluster:
            return cls(ml_client, name=name, shutdown_on_close=shutdown_on_close,
                       asynchronous=asynchronous, _attach=True,
                       _existing_worker_jobs=tuple(found["worker_jobs"]),
                       **{**found["settings"], **kwargs})  # fmt: skip

        if not asynchronous:
            return attach(describe_cluster(ml_client, name))

        async def attach_async() -> AmlComputeCluster:  # the lookup runs off the event loop
            return await attach(await describe_cluster_async(AmlOps(ml_client), name))

        return attach_async()  # type: ignore[return-value]

    async def _start(self) -> None:
        if self.status.name in ("running", "closed"):
            return await super()._start()
        ctx = self._context
        try:
            await self._prepare()
            await super()._start()
        except RuntimeError as exc:
            # SpecCluster wraps start failures in RuntimeError; surface our typed error.
            if isinstance(exc.__cause__, AmlComputeError):
                raise exc.__cause__ from None
            failure = await failed_error(ctx.ops, self.main_job_name, LOOKUP_TIMEOUT)
            if failure is not None:  # e.g. the node died right after publishing its address
                raise failure from exc
            raise

    async def _prepare(self) -> None:
        """Complete the plan (:func:`~.backend.plan.plan_cluster`); build the worker specs once."""
        ctx = self._context
        ctx.state.plan = await plan_cluster(ctx.settings, ctx.ops, ctx.plan, self._log)
        self._build_worker_specs()

    async def _close(self) -> None:
        state, scheduler = self._context.state, self.scheduler
        if not self.shutdown_on_close:
            # not ours (even if this object failed to connect): disconnect, leave it running
            state.lifecycle = Lifecycle.DETACHING
            if self._reaper_key is not None:  # owned once, left running now: not ours to stop
                reaper.release(self._reaper_key, detached=True)
            self.shutdown_scheduler = False
            if self.status.name != "running":  # never connected: no worker groups to keep
                self.worker_spec.clear()
            await asyncio.gather(*(w.close() for w in self.workers.values()))
            await super()._close()
            if scheduler is not None:
                await scheduler.close()
            return
        state.lifecycle = Lifecycle.CLOSING
        self._connector.expect_end()  # the scheduler stops next: its tunnel ends with it
        dead = scheduler if scheduler is not None and await scheduler.gone() else None
        if dead is not None:  # the scheduler is gone with its job: no connect timeouts on it
            dead.status = Status.failed
            self.shutdown_scheduler = False
        await super()._close()
        if dead is not None:
            await dead.close()
        if self._reaper_key is not None:
            reaper.release(self._reaper_key)
        await self._release_compute()

    async def _release_compute(self) -> None:
        """Delete the compute this cluster created, or say how long its nodes stay billed."""
        state, name = self._context.state, self.settings.compute
        if state.plan.created_compute and self.settings.delete_compute_on_close:
            state.plan = replace(state.plan, created_compute=False)  # once
            self._log(f"Deleting AmlCompute {name} (delete_compute_on_close)")
            try:
                await self._context.ops.delete_compute(name, timeout=COMPUTE_TIMEOUT)
                self._log(f"Deleted AmlCompute {name}")
            except Exception as exc:
                logger.warning(
                    "Could not delete compute %s: %s. Delete it in Azure ML studio or with "
                    "`az ml compute delete -n %s`; with 0 nodes at rest it bills nothing.",
                    name, exc, name,
                )  # fmt: skip
        elif state.plan.compute is not None and state.plan.compute.idle_seconds:
            self._log(
                f"AML releases the nodes of {state.plan.compute.name} "
                f"{state.plan.compute.idle_seconds}s after its last job ends (idle time before "
                "scale-down); they are billed until then."
            )

    async def _correct_state_internal(self) -> None:
        try:
            await super()._correct_state_internal()
        except OSError as exc:
            # A pooled comm can go stale (e.g. after the SSH tunnel reconnected); the rpc
            # opens a fresh one on the next call, so try once more before giving up.
            logger.info("Retrying cluster state correction after %s", exc)
            await super()._correct_state_internal()

    def _log(self, log: str) -> None:
        """Store a progress message for ``get_logs()`` and show it unless quiet."""
        logger.info(log)
        self.quiet = self._quiet
        super()._log(log)

    def job_spec(self) -> dict[str, Any]:
        """The REST body of the main AML job, as it would be submitted (nothing is sent).

        To review the command, environment and limits, or to submit the job by other
        means. With ``security=True`` the TLS certificate and key, which the submitted
        body carries in plain text, show as :data:`SECRET_IN_JOB_BODY`.
        """
        job = MainJob(self._context, self._connector, self._watch).job()
        body = job._to_job()._to_rest_object().as_dict()
        env = body["properties"].get("environmentVariables") or {}
        env.update(dict.fromkeys(set(self._context.secret_env) & set(env), SECRET_IN_JOB_BODY))
        return body

    def resolve(self, uri: str, **kwargs: Any) -> Any:
        """An fsspec URL and adlfs ``storage_options`` for an ``azureml://`` datastore URI.

        See :func:`dask_amlcompute.data.resolve`: the data then flows between workers
        and storage, never through this client.

        Examples
        --------
        >>> r = cluster.resolve("azureml://datastores/lake/paths/sales/")  # doctest: +SKIP
        >>> df = dd.read_parquet(r.url, storage_options=r.storage_options)  # doctest: +SKIP
        """
        from .data import resolve

        return resolve(uri, self.ml_client, **kwargs)

    @property
    def jobs(self) -> dict[str, str]:
        """AML jobs of this cluster and their last known status."""
        return dict(self._context.state.jobs)

    @property
    def startup_phases(self) -> dict[str, float]:
        """Seconds from submission to each startup phase reached.

        ``submitted`` (not when reconnected), ``Running``, ``scheduler address`` (the
        node published it), ``connected``, ``workers joined`` (the main job's).
        """
        return dict(self._context.state.phases.reached)

    @property
    def ended_reason(self) -> str | None:
        """Why the cluster ended or was lost while it ran, and what to do (None if it was not).

        E.g. ``job_timeout`` reached, a node lost or preempted, the tunnel gone; logged once.
        """
        return self._context.state.lost_reason

    @property
    def dashboard_link(self) -> str:
        link = getattr(self.scheduler, "dashboard_link", None)
        if link and (self._connector.mode != "direct" or self._connector.relay is not None):
            return link  # forwarded through a tunnel, or published on this compute instance
        return super().dashboard_link

    async def _get_logs(self, cluster=True, scheduler=True, workers=True):
        logs = await super()._get_logs(cluster=cluster, scheduler=scheduler, workers=workers)
        if cluster:
            ops = self._context.ops
            for job_name in self._context.state.jobs:
                _, files = await ops.run_details(job_name)
                tail = await ops.log_tail(files, lines=200) if files else None
                if tail:
                    logs[f"AML job {job_name}"] = tail
        return logs

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, price={self._context.plan.price!r})"

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        s, cell = (
            self.settings,
            '<td style="text-align: left;"{}><strong>{}:</strong> {}</td>'.format,
        )
        rows = [
            cell("", "Compute", html.escape(s.compute or f"serverless {s.instance_type}"))
            + cell("", "Nodes", f"{s.n_nodes} x {s.processes_per_node} process(es)"),
            cell(' colspan="2"', "Price", html.escape(self._context.plan.price)),
            *(cell("", "AML job", html.escape(job)) + cell("", "Status", html.escape(status))
              for job, status in self._context.state.jobs.items()),
        ]  # fmt: skip
        return super()._repr_html_(
            cluster_status="".join(f"<tr>{row}</tr>" for row in rows) + (cluster_status or "")
        )


async def discover() -> Any:
    """dask-ctl's ``dask_cluster_discovery`` entry point: the running clusters.

    Yields ``(name, AmlComputeCluster)`` for each in the config file's workspace (if any).
    """
    try:
        ops = AmlOps(ml_client_from_config())
    except WorkspaceNotConfiguredError:
        return
    jobs = await list_cluster_jobs_async(ops)
    for name in sorted({j.cluster for j in jobs if j.role == "cluster" and j.kind == "cluster"}):
        yield name, AmlComputeCluster
