"""Finding dask-amlcompute clusters in a workspace from their AML jobs.

Every job of a cluster carries the tags ``dask_cluster`` (the cluster name)
and ``dask_role`` (``cluster`` for the main job, ``workers`` for worker jobs).
Used by :meth:`AmlComputeCluster.from_name`, the CLI (``list``/``logs``/``down``)
and dask-ctl's ``dask_cluster_discovery`` entry point (:func:`discover`).
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ._protocol import TAG_CLUSTER, TAG_MODE, TAG_ROLE
from .backend.ops import TERMINAL_STATUSES, status_text
from .exceptions import AmlComputeError


@dataclass(frozen=True)
class ClusterJob:
    """One AML job of a dask-amlcompute cluster."""

    cluster: str
    role: str
    name: str
    status: str
    n_nodes: int
    compute: str | None
    created_by: str | None = None
    #: ``"cluster"`` (an AmlComputeCluster) or ``"script"`` (``dask-amlcompute run``).
    kind: str = "cluster"


def _short_compute(compute: Any) -> str | None:
    if not compute:
        return None
    return str(compute).rstrip("/").rsplit("/", 1)[-1]


def _as_cluster_job(job: Any) -> ClusterJob | None:
    tags = job.tags or {}
    if TAG_CLUSTER not in tags:
        return None
    resources = getattr(job, "resources", None)
    creation = getattr(job, "creation_context", None)
    return ClusterJob(
        cluster=tags[TAG_CLUSTER],
        role=tags.get(TAG_ROLE, "?"),
        name=job.name,
        status=status_text(job.status),
        n_nodes=int(getattr(resources, "instance_count", None) or 1),
        compute=_short_compute(getattr(job, "compute", None)),
        created_by=getattr(creation, "created_by", None),
        kind="script" if tags.get(TAG_MODE) == "script" else "cluster",
    )


def list_cluster_jobs(ml_client: Any, *, include_ended: bool = False) -> list[ClusterJob]:
    """The jobs of every dask-amlcompute cluster in the workspace (active ones by default)."""
    from azure.ai.ml.constants import ListViewType

    view = ListViewType.ALL if include_ended else ListViewType.ACTIVE_ONLY
    out = []
    for job in ml_client.jobs.list(list_view_type=view):
        cj = _as_cluster_job(job)
        if cj is not None and (include_ended or cj.status not in TERMINAL_STATUSES):
            out.append(cj)
    return out


def describe_cluster(ml_client: Any, name: str) -> dict[str, Any]:
    """Settings and live worker jobs of the running cluster ``name``.

    Raises
    ------
    AmlComputeError
        No running cluster of that name.
    """
    from azure.core.exceptions import ResourceNotFoundError

    from .node.entry import _parse_args

    try:
        main = ml_client.jobs.get(f"{name}-main")
    except ResourceNotFoundError:
        raise AmlComputeError(
            f"No dask-amlcompute cluster named {name!r} in this workspace "
            "(`dask-amlcompute list` shows the running ones)."
        ) from None
    status = status_text(main.status)
    if status in TERMINAL_STATUSES:
        raise AmlComputeError(f"Cluster {name!r} has ended (its main job is {status}).")
    argv = shlex.split(main.command or "")
    args = _parse_args(argv[3:]) if argv[:3] == ["python", "-m", "dask_amlcompute.node"] else None
    settings: dict[str, Any] = {
        "compute": _short_compute(main.compute),
        "n_nodes": int(getattr(main.resources, "instance_count", None) or 1),
        "experiment_name": main.experiment_name,
    }
    dist = getattr(main, "distribution", None)
    if dist is not None and "mpi" in type(dist).__name__.lower():
        settings["distribution"] = "mpi"
    if args is not None:
        settings.update(
            processes_per_node=args.processes,
            threads_per_process=args.threads or None,
            memory_limit=args.memory_limit,
            worker_on_scheduler=args.worker_on_scheduler,
            scheduler_port=args.scheduler_port,
            dashboard_port=args.dashboard_port,
        )
    workers = [
        (j.name, j.n_nodes)
        for j in list_cluster_jobs(ml_client)
        if j.cluster == name and j.role == "workers"
    ]
    return {"settings": settings, "worker_jobs": workers}


async def discover() -> AsyncIterator[tuple[str, Callable]]:
    """dask-ctl discovery: yield ``(name, AmlComputeCluster)`` for running clusters.

    Uses the workspace config file (``config.json``) and ``DefaultAzureCredential``;
    yields nothing when no workspace is configured.
    """
    import asyncio

    from .backend.workspace import ml_client_from_config
    from .cluster import AmlComputeCluster
    from .exceptions import WorkspaceNotConfiguredError

    try:
        ml_client = ml_client_from_config()
    except WorkspaceNotConfiguredError:
        return
    jobs = await asyncio.to_thread(list_cluster_jobs, ml_client)
    for name in sorted({j.cluster for j in jobs if j.role == "cluster" and j.kind == "cluster"}):
        yield name, AmlComputeCluster
