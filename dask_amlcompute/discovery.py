"""Finding dask-amlcompute clusters in a workspace from their AML jobs' tags.

Every job of a cluster carries ``dask_cluster`` (its name) and ``dask_role``
(``cluster`` or ``workers``); the main job also its settings (``dask_settings``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ._protocol import (
    TAG_CLUSTER,
    TAG_MODE,
    TAG_ROLE,
    TAG_USER,
    cluster_key_tag,
    main_job_name,
    read_settings_tag,
)
from .backend.ops import TERMINAL_STATUSES, AmlOps, run_blocking, status_text
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
    #: The ``dask_user`` tag: the login that started the cluster.
    user: str | None = None
    #: When the job was submitted (timezone-aware), if AML says.
    created_at: Any = None


def _short_compute(compute: Any) -> str | None:
    return str(compute).rstrip("/").rsplit("/", 1)[-1] if compute else None


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
        user=tags.get(TAG_USER),
        created_at=getattr(creation, "created_at", None),
    )


async def list_cluster_jobs_async(
    ops: AmlOps, *, include_ended: bool = False, cluster: str | None = None
) -> list[ClusterJob]:
    """The jobs of every dask-amlcompute cluster (or of ``cluster``), active ones by default.

    AML lists only the jobs with the cluster tag key: other jobs cost no request.
    """
    tag = TAG_CLUSTER if cluster is None else cluster_key_tag(cluster)
    jobs = await ops.list_jobs(include_ended=include_ended, tag=tag)
    found = [_as_cluster_job(job) for job in jobs]
    return [j for j in found if j and (include_ended or j.status not in TERMINAL_STATUSES)]


async def describe_cluster_async(ops: AmlOps, name: str) -> dict[str, Any]:
    """``{"settings": {...}, "worker_jobs": [(job name, nodes)]}`` of the running cluster ``name``.

    The settings (keyword arguments of the cluster) come from the main job and its
    ``dask_settings`` tag. AmlComputeError: no such running cluster, or no settings tag.
    """
    main, jobs, _ = await asyncio.gather(  # the workspace: for the cluster's VM size
        ops.get_job_entity(main_job_name(name)),
        list_cluster_jobs_async(ops, cluster=name),
        ops.read_ahead(),
    )
    if main is None:
        raise AmlComputeError(
            f"No dask-amlcompute cluster named {name!r} in this workspace "
            "(`dask-amlcompute list` shows the running ones)."
        )
    status = status_text(main.status)
    if status in TERMINAL_STATUSES:
        raise AmlComputeError(f"Cluster {name!r} has ended (its main job is {status}).")
    settings: dict[str, Any] = {
        "compute": _short_compute(main.compute),
        "n_nodes": int(getattr(main.resources, "instance_count", None) or 1),
        "experiment_name": main.experiment_name,
    }
    if not settings["compute"] or settings["compute"] == "serverless":  # a serverless cluster
        settings["compute"] = None
        settings["instance_type"] = getattr(main.resources, "instance_type", None)
        tier = getattr(getattr(main, "queue_settings", None), "job_tier", None)
        settings["job_tier"] = "spot" if str(tier or "").lower() == "spot" else "standard"
    try:
        stored = read_settings_tag(main.tags)
    except ValueError as exc:
        raise AmlComputeError(
            f"Job {main.name} is not the main job of a dask-amlcompute cluster ({exc})."
        ) from None
    settings.update(stored)
    workers = [(j.name, j.n_nodes) for j in jobs if j.role == "workers"]
    return {"settings": settings, "worker_jobs": workers}


def list_cluster_jobs(ml_client: Any, *, include_ended: bool = False) -> list[ClusterJob]:
    """Blocking form of :func:`list_cluster_jobs_async`."""
    return run_blocking(list_cluster_jobs_async(AmlOps(ml_client), include_ended=include_ended))


def describe_cluster(ml_client: Any, name: str) -> dict[str, Any]:
    """Blocking form of :func:`describe_cluster_async` (for :meth:`AmlComputeCluster.from_name`)."""
    return run_blocking(describe_cluster_async(AmlOps(ml_client), name))
