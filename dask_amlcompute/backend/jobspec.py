"""Pure functions that build the AML command jobs of a cluster (``cluster.job_spec()`` shows them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._protocol import (
    TAG_CLUSTER,
    TAG_ROLE,
    TAG_USER,
    TAG_VERSION,
    NodeOptions,
    cluster_key_tag,
    cluster_settings,
    node_command,
    settings_tag,
)
from .._version import __version__

if TYPE_CHECKING:
    from ..config import ClusterSettings

#: Name of the main job's SSH service (AML's ``services`` key).
SSH_SERVICE_NAME = "dask_ssh"


def cluster_tags(cluster_name: str, role: str, extra: Mapping[str, str] | None = None) -> dict:
    """Tags that let ``from_name``/``list`` find the jobs of a cluster."""
    import contextlib
    import getpass

    tags = dict(extra or {})
    tags.update({TAG_CLUSTER: cluster_name, TAG_ROLE: role, TAG_VERSION: __version__})
    tags[cluster_key_tag(cluster_name)] = role  # the key the cluster's job watch lists by
    with contextlib.suppress(Exception):  # no user name in some containers (for down --all-mine)
        tags.setdefault(TAG_USER, getpass.getuser())
    return tags


def build_job(
    settings: ClusterSettings,
    *,
    name: str,
    n_nodes: int,
    node: NodeOptions,
    environment: Any,
    timeout_seconds: float | None,
    code: str | None = None,
    env_vars: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    ssh_public_key: str | None = None,
):
    """The AML command job (``azure.ai.ml.entities.Command``) of the main job or a worker job.

    ``settings`` give the compute (``worker_compute`` for worker jobs, if set; none: a
    serverless job of ``instance_type`` and ``job_tier``), experiment, distribution, name and
    tags. The main job (``node.role == "cluster"``) also carries the cluster's settings in
    one JSON tag (:data:`~dask_amlcompute._protocol.SETTINGS_TAG`), which ``from_name`` reads.

    Parameters
    ----------
    name, n_nodes, node
        AML job name (unique in the workspace), ``instance_count``, the node entrypoint's options.
    environment
        What :func:`~dask_amlcompute.backend.environment.environment_from_settings` returned.
    timeout_seconds
        ``limits.timeout`` of the job, the server-side backstop.
    code
        The code snapshot: a local folder (the SDK uploads it) or a code asset's ARM id.
    env_vars, tags
        Node environment variables and more job tags.
    ssh_public_key
        Declare AML's job SSH service on node 0 (the scheduler's), accepting this OpenSSH key.
    """
    from azure.ai.ml import MpiDistribution, PyTorchDistribution, command
    from azure.ai.ml.entities import QueueSettings, SshJobService

    s = settings
    compute = s.worker_compute if node.role == "workers" and s.worker_compute else s.compute
    distribution = {"mpi": MpiDistribution, "pytorch": PyTorchDistribution}[s.distribution]
    all_tags = cluster_tags(s.name, node.role, {**s.tags, **(tags or {})})
    if node.role == "cluster":
        extra = {"nodes_per_job": s.nodes_per_job}
        all_tags.update(settings_tag(cluster_settings(node, s.distribution, extra)))
    job = command(
        name=name,
        display_name=f"{s.name} ({node.role})",
        description=f"Dask cluster {s.name}: {node.role} job started by dask-amlcompute",
        command=node_command(node),
        code=code,
        compute=compute,
        instance_count=n_nodes,
        instance_type=s.instance_type if compute is None else None,
        distribution=distribution(process_count_per_instance=1),
        environment=environment,
        environment_variables=dict(env_vars or {}),
        experiment_name=s.experiment_name,
        timeout=int(timeout_seconds) if timeout_seconds else None,
        tags=all_tags,
        services={SSH_SERVICE_NAME: SshJobService(ssh_public_keys=ssh_public_key)}
        if ssh_public_key
        else None,
    )
    if compute is None:
        job.queue_settings = QueueSettings(job_tier=s.job_tier)
    return job
