"""The plan and state of one cluster, shared by the cluster object and its jobs.

:class:`ClusterPlan`: what was decided before the first submission (:mod:`~.plan`).
:class:`ClusterState`: the only mutable thing the cluster and its ProcessInterfaces share.
:class:`ClusterContext`: what is fixed for the cluster's life (settings, SDK operations, log).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .._protocol import NodeOptions, main_job_name
from ..config import ClusterSettings
from .capacity import VmSizeInfo
from .jobspec import build_job
from .ops import ENDING, AmlOps, ComputeInfo, JobInfo

#: The node options that are settings of the same name.
SAME_NAMES = (
    "memory_limit", "scheduler_port", "dashboard_port", "worker_on_scheduler", "death_timeout",
    "idle_timeout", "no_client_timeout", "first_contact_timeout", "scheduler_options",
    "worker_options",
)  # fmt: skip


class Lifecycle(enum.Enum):
    """Where a cluster object is in its life.

    Starting (submitting or reconnecting), running (jobs watched), closing its own cluster
    (jobs retired and cancelled), or detaching from one it does not own (nothing changes).
    """

    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    DETACHING = "detaching"


@dataclass(frozen=True)
class ClusterPlan:
    """What a cluster runs on and with, decided before its first submission.

    Attributes
    ----------
    mode
        ``"create"``: a new cluster; ``"attach"``: reconnecting to a running one.
    environment
        What the jobs run in; a new cluster's plan registers it (``name:version``).
    code
        The jobs' code snapshot: the staged folder (:mod:`~dask_amlcompute.backend.snapshot`);
        a new cluster's plan registers it (the code asset's ARM id).
    job_ssh_key
        The private key the main job's SSH service accepts (None: the job
        declares no SSH service, or a reattached object does not know it).
    compute, worker_compute
        The compute target (serverless: what AML allocates), and the worker jobs' one.
    created_compute
        True when this cluster created its compute (``create_compute=``).
    vm_size, price
        The compute's VM size as the region lists it (None: unknown), the price text.
    queue_hint
        Why a Queued job waits, as the quota check saw it (None: no reason).
    gpus_per_node
        GPUs per node when the workers are dask-cuda workers (one per GPU); 0: CPU workers.
    """

    mode: Literal["create", "attach"]
    environment: Any
    code: str | None = None
    job_ssh_key: Any = None
    compute: ComputeInfo | None = None
    worker_compute: ComputeInfo | None = None
    created_compute: bool = False
    vm_size: VmSizeInfo | None = None
    price: str = "price unknown"
    queue_hint: str | None = None
    gpus_per_node: int = 0


@dataclass
class Phases:
    """When the cluster's startup reached each phase.

    ``started``: ``time.monotonic()`` when it started submitting; ``reached``: phase -> seconds
    since then (:meth:`mark`); ``spent``: seconds the main job spent in Preparing and in Queued
    (bounded by ``prepare_timeout`` and ``queue_timeout``, not by ``startup_timeout``).
    """

    started: float = field(default_factory=time.monotonic)
    reached: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)

    def mark(self, phase: str) -> None:
        """Record when ``phase`` was first reached."""
        self.reached.setdefault(phase, round(time.monotonic() - self.started, 3))


@dataclass
class ClusterState:
    """What the cluster and its ProcessInterfaces know and change while it runs.

    Attributes
    ----------
    plan
        What was decided before the first submission (see :mod:`~dask_amlcompute.backend.plan`).
    lifecycle, phases
        See :class:`Lifecycle`, :class:`Phases`.
    jobs
        AML job name -> last known status.
    deadline
        ``time.monotonic()`` when the cluster's ``job_timeout`` runs out (None: none).
    scheduler_address
        The scheduler's address as the nodes reach it (worker jobs dial it).
    lost_reason
        Why the cluster ended or was lost while it ran (see ``ClusterLostError``).
    """

    plan: ClusterPlan
    lifecycle: Lifecycle = Lifecycle.STARTING
    jobs: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None
    scheduler_address: str | None = None
    lost_reason: str | None = None
    phases: Phases = field(default_factory=Phases)

    @property
    def closing(self) -> bool:
        """True once the cluster object is closing or detaching."""
        return self.lifecycle in (Lifecycle.CLOSING, Lifecycle.DETACHING)

    def remaining(self) -> float | None:
        """Seconds left before the cluster's deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True)
class ClusterContext:
    """What every job of a cluster needs and that does not change while it runs.

    Attributes
    ----------
    settings, ops, state
        The validated settings, the SDK operations, the shared :class:`ClusterState`.
    log
        Shows a progress message (and records it for ``get_logs``).
    connection_args, secret_env
        The client's Dask connection arguments (TLS); node environment variables never
        shown (TLS material).
    credential
        The Azure credential given to the cluster, if any (tokens for AML's
        job-service proxy; None: the ``MLClient``'s).
    """

    settings: ClusterSettings
    ops: AmlOps
    state: ClusterState
    log: Callable[[str], None]
    connection_args: dict[str, Any] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)
    credential: Any = None

    @property
    def plan(self) -> ClusterPlan:
        """The cluster's plan (see :mod:`~dask_amlcompute.backend.plan`)."""
        return self.state.plan

    @property
    def main_job(self) -> str:
        """The AML job running the scheduler."""
        return main_job_name(self.settings.name)

    def main_job_ended(self) -> bool:
        """True once the main job (hence the scheduler) is known to have ended."""
        return self.state.jobs.get(self.main_job) in ENDING

    def note(self, info: JobInfo) -> str | None:
        """Record a job's latest status in ``state.jobs``; return the one it had."""
        previous = self.state.jobs.get(info.name)
        self.state.jobs[info.name] = info.status
        return previous

    def node_options(
        self, role: str, prefix: str, scheduler_address: str | None = None
    ) -> NodeOptions:
        """Node entrypoint options for a job of this cluster."""
        s = self.settings
        return NodeOptions(
            role=role,
            name_prefix=prefix,
            processes=self.plan.gpus_per_node or s.processes_per_node,
            threads=s.threads_per_process,
            job_timeout=s.job_timeout if role == "cluster" else None,
            scheduler_address=scheduler_address,
            cuda=self.plan.gpus_per_node > 0,
            **{name: getattr(s, name) for name in SAME_NAMES},
        )

    def build(
        self,
        name: str,
        role: str,
        n_nodes: int,
        timeout: float | None,
        scheduler: str | None = None,
    ) -> Any:
        """The AML job entity for one of this cluster's jobs (``scheduler``: its address)."""
        s, plan = self.settings, self.plan
        key = plan.job_ssh_key if role == "cluster" else None
        return build_job(
            s,
            name=name,
            n_nodes=n_nodes,
            node=self.node_options(role, name, scheduler),
            environment=plan.environment,
            code=plan.code,
            timeout_seconds=timeout,
            env_vars={**s.env_vars, **self.secret_env},
            ssh_public_key=key and key.export_public_key("openssh").decode("ascii").strip(),
        )
