"""Scaling an AmlComputeCluster: worker jobs for ``scale()`` and ``adapt()``.

AML cannot add nodes to a running job: extra capacity comes as worker jobs of
``nodes_per_job`` nodes each, one SpecCluster worker group per job.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from dask.utils import parse_bytes
from distributed.deploy.adaptive import Adaptive
from distributed.utils import NoOpAwaitable

from ._protocol import is_main_job, worker_job_name
from .backend.jobs import MainJobWorkers, WorkerJob
from .backend.ops import MAX_CONCURRENT_WRITES
from .backend.state import Lifecycle
from .config import schema
from .exceptions import ClusterLostError, ConfigurationError
from .node.plugins import job_of_worker
from .validation import MAX_WORKERS, count, parse_duration

if TYPE_CHECKING:
    from distributed.deploy.spec import SpecCluster

    _ClusterBase = SpecCluster  # what the mixin extends; at runtime only AmlComputeCluster does
else:
    _ClusterBase = object


class ScalingMixin(_ClusterBase):
    """``scale``/``adapt`` for :class:`~dask_amlcompute.AmlComputeCluster` (a SpecCluster)."""

    # provided by AmlComputeCluster / SpecCluster
    settings: Any
    _context: Any
    main_job_name: str
    _main_workers: int
    _workers_per_job: int
    _job_series: str
    _existing_worker_jobs: tuple[tuple[str, int], ...]
    _watch: Any
    #: Worker jobs that ended because AML preempted a low-priority node.
    preemptions: int = 0

    def _new_worker_name(self, worker_number: int) -> str:
        return worker_job_name(self.settings.name, worker_number, self._job_series)

    def new_worker_spec(self) -> dict[str, Any]:
        """The next worker job; AML job names are never reused, so numbers only grow."""
        spec = super().new_worker_spec()
        self._i += 1
        return spec

    def _build_worker_specs(self) -> None:
        """The worker specs, once, from the plan (on a GPU size: one dask-cuda worker per GPU)."""
        ctx, settings = self._context, self.settings
        suffixes = ctx.node_options("cluster", "x").worker_suffixes(settings.n_nodes)
        job_suffixes = ctx.node_options("workers", "x").worker_suffixes(settings.nodes_per_job)
        self._main_workers, self._workers_per_job = len(suffixes), len(job_suffixes)
        if suffixes:
            self.worker_spec[self.main_job_name] = {
                "cls": MainJobWorkers,
                "options": {"context": ctx, "suffixes": suffixes},
                "group": suffixes,
            }
        options = dict(context=ctx, suffixes=job_suffixes, watch=self._watch,
                       on_ended=self._worker_job_ended, n_nodes=settings.nodes_per_job)  # fmt: skip
        self.new_spec = {"cls": WorkerJob, "options": options, "group": job_suffixes}
        for job_name, n in self._existing_worker_jobs:  # reconnecting: adopt the running ones
            group = ctx.node_options("workers", "x").worker_suffixes(n)
            adopted = {**options, "suffixes": group, "n_nodes": n, "existing": True}
            self.worker_spec[job_name] = {"cls": WorkerJob, "options": adopted, "group": group}

    def _max_nodes(self) -> int | None:
        compute = self._context.plan.compute
        return compute.max_nodes if compute is not None and compute.max_nodes else None

    def _worker_node_limit(self) -> int | None:
        """Nodes the worker jobs may have together (None: no limit known)."""
        plan = self._context.plan
        if self.settings.compute is None and not self.settings.serverless_network:
            return 0  # one serverless job is the whole cluster (see _refuse_serverless_growth)
        if plan.worker_compute is not None:  # worker jobs on a compute of their own
            return plan.worker_compute.max_nodes or None
        max_nodes = self._max_nodes()
        return None if max_nodes is None else max(0, max_nodes - self.settings.n_nodes)

    def _jobs_for_workers(self, n: int) -> int:
        """Extra worker jobs needed for ``n`` workers in total, clipped to the compute's max."""
        jobs = math.ceil(max(0, n - self._main_workers) / self._workers_per_job)
        limit, s = self._worker_node_limit(), self.settings
        if limit is not None and jobs > (fit := limit // s.nodes_per_job):
            where = (f"worker compute {s.worker_compute!r} has at most {limit}" if s.worker_compute
                     else f"compute {s.compute!r} has at most {self._max_nodes()}")  # fmt: skip
            self._log(
                f"Asked for {n} workers, but {where} nodes: scaling to {fit} worker job(s) "
                f"({self._main_workers + fit * self._workers_per_job} workers)."
            )
            jobs = fit
        return jobs

    def _to_workers(self, nodes: int) -> int:
        """Workers of the cluster with ``nodes`` nodes in total (the main job's always)."""
        per_node = self._workers_per_job // self.settings.nodes_per_job
        return self._main_workers + max(0, nodes - self.settings.n_nodes) * per_node

    def _count(self, value: Any, what: str, nodes: bool = False) -> Any:
        """A count of workers (or ``nodes``), None passing: at most what AML could ever run."""
        most = schema()["n-nodes"]["maximum"]
        bound = most if nodes else min(self._to_workers(self.settings.n_nodes + most), MAX_WORKERS)
        return None if value is None else count(value, what, 0, bound)

    def _refuse_serverless_growth(self, workers: float) -> None:
        """Refuse worker jobs on serverless (unless ``serverless_network``): unreachable."""
        s = self.settings
        if s.compute is None and not s.serverless_network and workers > self._main_workers:
            raise ConfigurationError(
                f"This cluster runs as one serverless job ({s.n_nodes} node(s), "
                f"{self._main_workers} worker(s)); separate serverless jobs are not documented to "
                "reach each other, so it cannot add worker jobs. Start it with more n_nodes, or set "
                "serverless_network=True if the workspace's serverless jobs share a network "
                "(a managed virtual network or a custom subnet)."
            )

    def _raise_if_lost(self) -> None:
        """Raise :class:`ClusterLostError` once the scheduler is gone for good."""
        state = self._context.state
        if state.lost_reason is not None and not state.closing:  # closing scales to 0: fine
            raise ClusterLostError(state.lost_reason)

    def scale(
        self,
        n: int | None = None,
        memory: str | int | None = None,
        cores: int | None = None,
        *,
        nodes: int | None = None,
    ):
        """Scale the cluster to ``n`` workers (or ``nodes`` nodes in total).

        The main job's nodes always stay; extra capacity comes as worker jobs of
        ``nodes_per_job`` nodes each, and scaling down retires a whole worker job's
        workers through the scheduler (their data moves first), then cancels the
        job so AML releases its nodes. The total never exceeds the compute's max nodes.

        Parameters
        ----------
        n
            Total number of workers wanted.
        memory, cores
            Scale to at least this much memory (``"64 GiB"`` or bytes) / this many
            threads, as in Dask, measured on the workers already running.
        nodes
            Total number of nodes wanted, main job included (instead of ``n``).

        Raises
        ------
        ConfigurationError
            A count that is no int from 0 to what AML could run, a memory that is no
            size; ``memory``/``cores`` with no worker running yet to measure.
        ClusterLostError
            The scheduler is gone for good (see :attr:`ended_reason`).
        """
        self._raise_if_lost()
        n, nodes = self._count(n, "scale(n)"), self._count(nodes, "scale(nodes)", nodes=True)
        if cores is not None:
            count(cores, "scale(cores=...)", 0)
        if memory is not None:
            try:
                memory = parse_bytes(memory)
            except (ValueError, TypeError, AttributeError):
                raise ConfigurationError(
                    f"scale(memory={memory!r}): give a size such as '64 GiB' or bytes."
                ) from None
        n = self._to_workers(nodes) if nodes is not None else n or 0
        if memory is not None:
            n = max(n, math.ceil(memory / self._per_worker("memory_limit", "memory")))
        if cores is not None:
            n = max(n, math.ceil(cores / self._per_worker("nthreads", "cores")))
        state = self._context.state
        if state.lifecycle is not Lifecycle.DETACHING:  # detaching: not ours to change
            if self.status.name in ("closing", "closed") or (n == 0 and state.closing):
                self.worker_spec.clear()
            else:
                self._set_worker_jobs(n)
        self._correct_soon()
        return NoOpAwaitable() if self.asynchronous else None

    scale_up = scale

    def _set_worker_jobs(self, n: int) -> None:
        """Add or drop worker jobs in ``worker_spec`` (pending ones first) for ``n`` workers."""
        self._refuse_serverless_growth(n)
        jobs = self._jobs_for_workers(n)
        extra = [k for k in self.worker_spec if k != self.main_job_name]
        pending = [k for k in extra if k not in self.workers]
        if jobs != len(extra):  # a burst of submissions or retirements: say so
            change = jobs - len(extra)
            self._context.log(
                f"Scaling to {jobs} worker job(s): "
                + (f"submitting {change}" if change > 0 else f"retiring {-change}")
                + f" (at most {MAX_CONCURRENT_WRITES} AML requests at a time)"
            )
        while len(extra) > jobs:
            key = pending.pop() if pending else extra[-1]
            extra.remove(key)
            del self.worker_spec[key]
        for _ in range(jobs - len(extra)):
            self.worker_spec.update(self.new_worker_spec())

    def _per_worker(self, field: str, what: str) -> float:
        """The smallest ``field`` (memory_limit, nthreads) of the running workers."""
        found = [w[field] for w in self.scheduler_info.get("workers", {}).values() if w.get(field)]
        if not found:
            raise ConfigurationError(
                f"scale({what}=...) measures the {what} of the running workers, and none runs "
                "yet (or they have no limit). Use scale(n) or scale(nodes=k) instead."
            )
        return min(found)

    async def scale_down(self, workers) -> None:
        """Close the worker jobs of ``workers``; the main job's workers stay."""
        keep = [w for w in workers if is_main_job(job_of_worker(w), self.settings.name)]
        await super().scale_down([w for w in workers if w not in keep])

    # minimum/maximum come first (adapt(2, 10)); SpecCluster's first parameter is Adaptive
    def adapt(  # type: ignore[override]
        self,
        minimum: int | None = None,
        maximum: int | None = None,
        *,
        minimum_nodes: int | None = None,
        maximum_nodes: int | None = None,
        interval: str | float = "10s",
        wait_count: int = 12,
        target_duration: str | float = "60s",
        **kwargs: Any,
    ) -> Adaptive:
        """Scale between ``minimum`` and ``maximum`` workers (or nodes) with the load.

        Defaults suit AML's minutes-long node start: decisions every 10 s, a worker job
        released after 12 idle decisions (2 minutes), queued work done within 60 s.
        Whole worker jobs come and go; the main job stays; the compute's max nodes caps.

        Parameters
        ----------
        minimum, maximum
            Bounds in workers. Default minimum: the main job's workers.
        minimum_nodes, maximum_nodes
            Bounds in nodes (main job included), instead of workers.
        interval, wait_count, target_duration
            As for :class:`distributed.deploy.Adaptive`.

        Raises
        ------
        ConfigurationError
            A bound that is no whole number from 0 to what AML could run, a
            minimum above the maximum, a bad interval, duration or count.
        """
        self._raise_if_lost()
        minimum, maximum = self._count(minimum, "minimum"), self._count(maximum, "maximum")
        minimum_nodes = self._count(minimum_nodes, "minimum_nodes", nodes=True)
        maximum_nodes = self._count(maximum_nodes, "maximum_nodes", nodes=True)
        for low, high in ((minimum, maximum), (minimum_nodes, maximum_nodes)):
            if low is not None and high is not None and low > high:
                raise ConfigurationError(
                    f"adapt: the minimum ({low}) is more than the maximum ({high})."
                )
        every = parse_duration(interval, "adapt(interval)", 0.1, 86400)
        target = parse_duration(target_duration, "adapt(target_duration)", 1)
        count(wait_count, "adapt(wait_count)", 1, 10**6)
        if minimum_nodes is not None:
            minimum = self._to_workers(minimum_nodes)
        if maximum_nodes is not None:
            maximum = self._to_workers(maximum_nodes)
        minimum = max(minimum or 0, self._main_workers)
        limit = self._worker_node_limit()
        cap: float = math.inf if limit is None else self._to_workers(self.settings.n_nodes + limit)
        upper = cap if maximum is None else min(maximum, cap)
        if maximum is not None:
            self._refuse_serverless_growth(maximum)
        return super().adapt(
            Adaptive=Adaptive,
            minimum=minimum,
            maximum=max(upper, minimum),
            interval=every,
            wait_count=wait_count,
            target_duration=target,
            worker_key=job_of_worker,
            **kwargs,
        )

    def _worker_job_ended(self, key: str, preempted: bool) -> None:
        """A worker job ended on its own (or was not submitted): drop it so adapt/scale replace it."""
        self.preemptions += preempted
        if key in self.worker_spec and not is_main_job(key, self.settings.name):
            del self.worker_spec[key]
            self._correct_soon()

    def _correct_soon(self) -> None:
        """Have SpecCluster start or close jobs to match ``worker_spec``."""
        loop = self.loop
        assert loop is not None  # SpecCluster's LoopRunner sets it in __init__
        loop.add_callback(self._correct_state)
