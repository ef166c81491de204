"""Resolve a cluster's settings from arguments, dask config and defaults.

Each setting is read with ``dask.config.get("amlcompute.<key>", override_with=arg)``
from one table, then validated; the result is an immutable
:class:`ClusterSettings` that the rest of the library reads.
"""

from __future__ import annotations

import getpass
import re
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from . import config
from .exceptions import ConfigurationError
from .validation import aml_name, parse_duration, positive_int, string_mapping


@dataclass(frozen=True)
class ClusterSettings:
    """Every setting of an :class:`~dask_amlcompute.AmlComputeCluster`, validated.

    Durations are in seconds. See ``amlcompute.yaml`` for the meaning of each key.
    """

    compute: str
    n_nodes: int
    nodes_per_job: int
    processes_per_node: int
    threads_per_process: int | None
    memory_limit: str | int | None
    worker_on_scheduler: bool
    environment: Any
    job_timeout: float | None
    startup_timeout: float
    experiment_name: str
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    distribution: str = "pytorch"
    scheduler_port: int = 8786
    dashboard_port: int = 8787
    death_timeout: float = 300.0
    idle_timeout: float | None = None
    no_client_timeout: float | None = 600.0
    connect: str = "direct"
    security: bool = False
    ssh_key: str | None = None
    known_hosts: str | None = None
    ssh_trust_on_first_use: bool = False
    poll_interval: float = 2.0
    watch_interval: float = 30.0
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    worker_options: dict[str, Any] = field(default_factory=dict)
    workspace_config: str | None = None
    pip_packages: list[str] = field(default_factory=list)
    conda_packages: list[str] = field(default_factory=list)
    node_package: str | None = None
    version_check: str = "raise"
    quiet: bool = False


def config_key(attribute: str) -> str:
    """The dask config key of a settings attribute (``n_nodes`` -> ``n-nodes``)."""
    return attribute.replace("_", "-")


def default_cluster_name() -> str:
    """``dask-{user}-{random}``, made safe for AML job names."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "user"
    user = re.sub(r"[^A-Za-z0-9]+", "", user).lower()[:20] or "user"
    return f"dask-{user}-{uuid.uuid4().hex[:8]}"


def resolve_settings(**arguments: Any) -> ClusterSettings:
    """Merge ``arguments`` (None means "not given") over dask config and validate.

    Raises
    ------
    ConfigurationError
        A value is missing or invalid; the message names it.
    """
    unknown = set(arguments) - {f.name for f in fields(ClusterSettings)}
    if unknown:
        raise TypeError(f"Unknown settings: {', '.join(sorted(unknown))}")
    raw = {
        f.name: config.get(config_key(f.name), override_with=arguments.get(f.name))
        for f in fields(ClusterSettings)
    }
    if not raw["compute"]:
        # Precedence: argument > dask config (incl. DASK_AMLCOMPUTE__COMPUTE) > the
        # compute cached in the workspace config.json > error.
        from .workspace import cached_compute

        raw["compute"] = cached_compute(raw["workspace_config"])
    if not raw["compute"]:
        raise ConfigurationError(
            "No compute given: pass compute='<AmlCompute name>', set amlcompute.compute "
            "in dask config (DASK_AMLCOMPUTE__COMPUTE), or cache it in the workspace "
            "config.json with dask_amlcompute.write_workspace_config(..., compute=...)."
        )
    raw["n_nodes"] = positive_int(raw["n_nodes"], "n_nodes")
    raw["nodes_per_job"] = positive_int(raw["nodes_per_job"], "nodes_per_job")
    raw["processes_per_node"] = positive_int(raw["processes_per_node"], "processes_per_node")
    if raw["threads_per_process"] is not None:
        raw["threads_per_process"] = positive_int(raw["threads_per_process"], "threads_per_process")
    for key in (
        "job_timeout",
        "startup_timeout",
        "death_timeout",
        "idle_timeout",
        "no_client_timeout",
        "poll_interval",
        "watch_interval",
    ):
        raw[key] = parse_duration(raw[key], key)
    if raw["startup_timeout"] is None:
        raise ConfigurationError("startup_timeout must be set: every wait is bounded.")
    if raw["distribution"] not in ("pytorch", "mpi"):
        raise ConfigurationError(
            f"distribution must be 'pytorch' or 'mpi', not {raw['distribution']!r}."
        )
    if raw["connect"] not in ("direct", "ssh", "auto"):
        raise ConfigurationError(
            f"connect must be 'direct', 'ssh' or 'auto', not {raw['connect']!r}."
        )
    raw["name"] = aml_name(raw["name"] or default_cluster_name(), "cluster name")
    raw["experiment_name"] = aml_name(raw["experiment_name"], "experiment_name")
    raw["tags"] = string_mapping(raw["tags"], "tags")
    raw["env_vars"] = string_mapping(raw["env_vars"], "env_vars")
    for key in ("scheduler_options", "worker_options"):
        if not isinstance(raw[key] or {}, dict):
            raise ConfigurationError(f"{key} must be a dict of keyword arguments.")
        raw[key] = dict(raw[key] or {})
    for key in ("scheduler_port", "dashboard_port"):
        if not isinstance(raw[key], int) or not 0 <= raw[key] < 65536:
            raise ConfigurationError(f"{key} must be a port number, got {raw[key]!r}.")
    raw["worker_on_scheduler"] = bool(raw["worker_on_scheduler"])
    raw["quiet"] = bool(raw["quiet"])
    from .versions import validate_policy

    raw["version_check"] = validate_policy(raw["version_check"])
    if not isinstance(raw["security"], bool):
        raise ConfigurationError(
            "security must be True or False (True: temporary TLS credentials for this cluster)."
        )
    return ClusterSettings(**raw)
