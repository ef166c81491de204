"""Pure functions that build the AML command jobs of a cluster.

Nothing here talks to AML: the result of :func:`build_job` is exactly what
:class:`~dask_amlcompute.AmlComputeCluster` submits, so ``cluster.job_spec()``
can show it and unit tests can check it without a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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

#: Name of the main job's SSH service (AML's ``services`` key).
SSH_SERVICE_NAME = "dask_ssh"


def cluster_tags(cluster_name: str, role: str, extra: Mapping[str, str] | None = None) -> dict:
    """Tags that let ``from_name``/``list`` find the jobs of a cluster."""
    import contextlib
    import getpass

    tags = dict(extra or {})
    tags.update({TAG_CLUSTER: cluster_name, TAG_ROLE: role, TAG_VERSION: __version__})
    tags[cluster_key_tag(cluster_name)] = role  # the key the cluster's job watch lists by
    # no user name in some containers: the tag is only a convenience for `down --all-mine`
    with contextlib.suppress(Exception):
        tags.setdefault(TAG_USER, getpass.getuser())
    return tags


def build_job(
    *,
    name: str,
    compute: str | None,
    n_nodes: int,
    node: NodeOptions,
    environment: Any,
    experiment_name: str,
    timeout_seconds: float | None,
    cluster_name: str,
    tags: Mapping[str, str] | None = None,
    env_vars: Mapping[str, str] | None = None,
    distribution: str = "pytorch",
    settings: Mapping[str, Any] | None = None,
    code: str | None = None,
    ssh_public_key: str | None = None,
    instance_type: str | None = None,
    job_tier: str = "standard",
):
    """Build the AML command job for the cluster's main job or a worker job.

    The main job (``node.role == "cluster"``) also carries the cluster's
    settings as one JSON tag (:data:`~dask_amlcompute._protocol.SETTINGS_TAG`),
    which :meth:`AmlComputeCluster.from_name` reads back.

    Parameters
    ----------
    name
        AML job name (unique in the workspace).
    compute
        AmlCompute target name; None: a serverless job of ``instance_type``.
    n_nodes
        ``instance_count`` of the job.
    node
        Options of the node entrypoint.
    environment
        What :func:`~dask_amlcompute.backend.environment.resolve_environment` returned.
    experiment_name
        Experiment the job is filed under (always set: the SDK would otherwise
        use the current folder's name).
    timeout_seconds
        ``limits.timeout`` of the job, the server-side backstop.
    cluster_name
        Name of the Dask cluster, stored as a tag.
    tags, env_vars
        Extra job tags and node environment variables.
    distribution
        ``"pytorch"`` or ``"mpi"``: how AML tells each node its rank.
    settings
        More cluster settings for the main job's settings tag (JSON values, by
        setting name, e.g. ``{"nodes_per_job": 2}``); those of ``node`` and
        ``distribution`` are always stored.
    code
        The job's code snapshot: a local folder (uploaded by the SDK, see
        :func:`~dask_amlcompute.backend.snapshot.stage_snapshot`) or the ARM id
        of a code asset AML already has. The nodes start in it.
    ssh_public_key
        Declare AML's job SSH service on node 0 (the scheduler's; AML's default
        without ``nodes="all"``), accepting this OpenSSH public key (how
        ``connect="auto"``/``"job-ssh"`` reach the scheduler without a public
        IP; the image needs ``openssh-server``, which AML's base images have).
    instance_type, job_tier
        Serverless jobs (``compute`` None): ``resources.instance_type`` and
        ``queue_settings.job_tier`` (``"standard"`` or ``"spot"``), as Microsoft
        Learn *Model training on serverless compute* submits them.

    Returns
    -------
    azure.ai.ml.entities.Command
        The job, ready for ``ml_client.jobs.create_or_update``.
    """
    from azure.ai.ml import MpiDistribution, PyTorchDistribution, command
    from azure.ai.ml.entities import SshJobService

    dist: MpiDistribution | PyTorchDistribution
    if distribution == "mpi":
        dist = MpiDistribution(process_count_per_instance=1)
    elif distribution == "pytorch":
        dist = PyTorchDistribution(process_count_per_instance=1)
    else:
        raise ValueError(f"distribution must be 'pytorch' or 'mpi', got {distribution!r}")
    env = dict(env_vars or {})
    tags = cluster_tags(cluster_name, node.role, tags)
    if node.role == "cluster":
        tags.update(settings_tag(cluster_settings(node, distribution, settings)))
    job = command(
        name=name,
        display_name=f"{cluster_name} ({node.role})",
        description=f"Dask cluster {cluster_name}: {node.role} job started by dask-amlcompute",
        command=node_command(node),
        code=code,
        compute=compute,
        instance_count=n_nodes,
        instance_type=instance_type if compute is None else None,
        distribution=dist,
        environment=environment,
        environment_variables=env,
        experiment_name=experiment_name,
        timeout=int(timeout_seconds) if timeout_seconds else None,
        tags=tags,
        services=(
            {SSH_SERVICE_NAME: SshJobService(ssh_public_keys=ssh_public_key)}
            if ssh_public_key
            else None
        ),
    )
    if compute is None:
        from azure.ai.ml.entities import QueueSettings

        job.queue_settings = QueueSettings(job_tier=job_tier)
    return job
