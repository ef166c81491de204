"""Pure functions that build the AML command jobs of a cluster.

Nothing here talks to AML: the result of :func:`build_job` is exactly what
:class:`~dask_amlcompute.AmlComputeCluster` submits, so ``cluster.job_spec()``
can show it and unit tests can check it without a network.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__

#: Job tags that identify a cluster's jobs.
TAG_CLUSTER = "dask_cluster"
TAG_ROLE = "dask_role"
TAG_VERSION = "dask_amlcompute"
TAG_USER = "dask_user"
#: ``"script"`` on the jobs of ``dask-amlcompute run`` (job mode); absent on clusters.
TAG_MODE = "dask_mode"

#: Run tags the scheduler node publishes (mlflow) and the client reads from the job.
SCHEDULER_TAG = "dask_scheduler"
DASHBOARD_TAG = "dask_dashboard"
VERSIONS_TAG = "dask_versions"


@dataclass(frozen=True)
class NodeOptions:
    """Command-line options of the in-job entrypoint ``python -m dask_amlcompute.node``.

    Attributes mirror the flags of :mod:`dask_amlcompute.node`.
    """

    role: str
    name_prefix: str
    processes: int = 1
    threads: int | None = None
    memory_limit: str | int | None = "auto"
    scheduler_port: int = 8786
    dashboard_port: int = 8787
    worker_on_scheduler: bool = True
    death_timeout: float = 300.0
    idle_timeout: float | None = None
    no_client_timeout: float | None = None
    first_contact_timeout: float | None = None
    scheduler_address: str | None = None
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    worker_options: Mapping[str, Any] = field(default_factory=dict)

    def worker_suffixes(self, n_nodes: int) -> list[str]:
        """Name suffixes of the workers this job starts (``-RANK-INDEX``)."""
        first = 0 if (self.role == "workers" or self.worker_on_scheduler) else 1
        return [f"-{r}-{i}" for r in range(first, n_nodes) for i in range(self.processes)]


def node_command(opts: NodeOptions) -> str:
    """The shell command every node of the job runs."""
    argv = [
        "python", "-m", "dask_amlcompute.node",
        "--role", opts.role,
        "--name-prefix", opts.name_prefix,
        "--processes", str(opts.processes),
        "--memory-limit", str(opts.memory_limit if opts.memory_limit is not None else "auto"),
        "--scheduler-port", str(opts.scheduler_port),
        "--dashboard-port", str(opts.dashboard_port),
        "--death-timeout", f"{opts.death_timeout:g}",
    ]  # fmt: skip
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    if not opts.worker_on_scheduler:
        argv.append("--no-worker-on-scheduler")
    if opts.idle_timeout:
        argv += ["--idle-timeout", f"{opts.idle_timeout:g}"]
    if opts.no_client_timeout:
        argv += ["--no-client-timeout", f"{opts.no_client_timeout:g}"]
        if opts.first_contact_timeout:
            argv += ["--first-contact-timeout", f"{opts.first_contact_timeout:g}"]
    if opts.scheduler_address:
        argv += ["--scheduler-address", opts.scheduler_address]
    if opts.scheduler_options:
        argv += ["--scheduler-options", json.dumps(dict(opts.scheduler_options), sort_keys=True)]
    if opts.worker_options:
        argv += ["--worker-options", json.dumps(dict(opts.worker_options), sort_keys=True)]
    return shlex.join(argv)


def cluster_tags(cluster_name: str, role: str, extra: Mapping[str, str] | None = None) -> dict:
    """Tags that let ``from_name``/``list`` find the jobs of a cluster."""
    import contextlib
    import getpass

    tags = dict(extra or {})
    tags.update({TAG_CLUSTER: cluster_name, TAG_ROLE: role, TAG_VERSION: __version__})
    # no user name in some containers: the tag is only a convenience for `down --all-mine`
    with contextlib.suppress(Exception):
        tags.setdefault(TAG_USER, getpass.getuser())
    return tags


def build_job(
    *,
    name: str,
    compute: str,
    n_nodes: int,
    node: NodeOptions,
    environment: Any,
    experiment_name: str,
    timeout_seconds: float | None,
    cluster_name: str,
    tags: Mapping[str, str] | None = None,
    env_vars: Mapping[str, str] | None = None,
    distribution: str = "pytorch",
):
    """Build the AML command job for the cluster's main job or a worker job.

    Parameters
    ----------
    name
        AML job name (unique in the workspace).
    compute
        AmlCompute target name.
    n_nodes
        ``instance_count`` of the job.
    node
        Options of the node entrypoint.
    environment
        What :func:`~dask_amlcompute.environment.resolve_environment` returned.
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

    Returns
    -------
    azure.ai.ml.entities.Command
        The job, ready for ``ml_client.jobs.create_or_update``.
    """
    from azure.ai.ml import MpiDistribution, PyTorchDistribution, command

    if distribution == "mpi":
        dist = MpiDistribution(process_count_per_instance=1)
    elif distribution == "pytorch":
        dist = PyTorchDistribution(process_count_per_instance=1)
    else:
        raise ValueError(f"distribution must be 'pytorch' or 'mpi', got {distribution!r}")
    env = dict(env_vars or {})
    return command(
        name=name,
        display_name=f"{cluster_name} ({node.role})",
        description=f"Dask cluster {cluster_name}: {node.role} job started by dask-amlcompute",
        command=node_command(node),
        compute=compute,
        instance_count=n_nodes,
        distribution=dist,
        environment=environment,
        environment_variables=env,
        experiment_name=experiment_name,
        timeout=int(timeout_seconds) if timeout_seconds else None,
        tags=cluster_tags(cluster_name, node.role, tags),
    )
