"""The contract between the client and the nodes of a job.

Both sides import this module (the node side imports nothing else of the
library's client side): the job tags that identify a cluster's jobs, the run
tags a scheduler publishes, and the node entrypoint's options.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
