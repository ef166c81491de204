"""dask-amlcompute's settings: dask config defaults, and one validated settings object.

Like distributed and dask-jobqueue, the defaults YAML is merged into dask's
defaults when the package is imported (``dask.config.update_defaults`` only
fills in defaults; it never overrides a user's settings). Each setting of a
cluster is read with ``dask.config.get("amlcompute.<key>", override_with=arg)``
from one table, then validated; the result is an immutable
:class:`ClusterSettings` that the rest of the library reads.
"""

from __future__ import annotations

import getpass
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import dask.config
import yaml

from .exceptions import ConfigurationError
from .validation import (
    aml_name,
    boolean,
    env_var_mapping,
    environment_setting,
    existing_file,
    memory_limit,
    optional_string,
    options_mapping,
    parse_duration,
    pip_requirements,
    port,
    positive_int,
    string_list,
    string_mapping,
    vm_size_name,
)

_HERE = os.path.dirname(__file__)
DEFAULTS_FILE = os.path.join(_HERE, "amlcompute.yaml")
SCHEMA_FILE = os.path.join(_HERE, "amlcompute-schema.yaml")


def _load_defaults() -> dict:
    with open(DEFAULTS_FILE) as f:
        return yaml.safe_load(f)


_registered = False


def cache_dir() -> Path:
    """The folder dask-amlcompute caches things in (snapshots, emulator downloads).

    ``$DASK_AMLCOMPUTE_CACHE``, else ``$XDG_CACHE_HOME/dask-amlcompute``, else
    ``~/.cache/dask-amlcompute``; created by whoever writes into it.
    """
    root = os.environ.get("DASK_AMLCOMPUTE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "dask-amlcompute"


def ensure_defaults() -> None:
    """Merge the package defaults into dask.config (idempotent)."""
    global _registered
    if not _registered:
        dask.config.update_defaults(_load_defaults())
        _registered = True


def get(key: str, override_with=None):
    """Read ``amlcompute.<key>`` from dask config unless ``override_with`` is given."""
    ensure_defaults()
    return dask.config.get(f"amlcompute.{key}", override_with=override_with)


@dataclass(frozen=True)
class ClusterSettings:
    """Every setting of an :class:`~dask_amlcompute.AmlComputeCluster`, validated.

    Durations are in seconds. See ``amlcompute.yaml`` for the meaning of each key.
    """

    #: The AmlCompute name; None: serverless jobs of ``instance_type``.
    compute: str | None
    n_nodes: int
    nodes_per_job: int
    processes_per_node: int
    threads_per_process: int | None
    memory_limit: str | int | float | None
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
    connect: str = "auto"
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
    prepare_timeout: float = 3600.0
    queue_timeout: float = 3600.0
    #: The AmlCompute to create when ``compute`` does not exist (see :func:`compute_request`).
    create_compute: ComputeRequest | None = None
    delete_compute_on_close: bool = False
    #: Serverless: the VM size of the jobs' nodes (no ``compute``).
    instance_type: str | None = None
    #: Serverless: ``"standard"`` (dedicated VMs) or ``"spot"`` (low-priority, preemptible).
    job_tier: str = "standard"
    #: Serverless: the workspace's serverless jobs share a network (managed VNet or custom
    #: subnet), so worker jobs can reach the main job's scheduler.
    serverless_network: bool = False
    #: The AmlCompute of the extra worker jobs (e.g. a low-priority cluster); None: ``compute``.
    worker_compute: str | None = None
    #: ``"auto"``: dask-cuda workers, one per GPU, on sizes with GPUs; ``"none"``: CPU workers.
    gpu_workers: str = "auto"


@dataclass(frozen=True)
class ComputeRequest:
    """What ``create_compute=`` asks for: an AmlCompute cluster with 0 nodes at rest.

    Attributes
    ----------
    size
        VM size (``Standard_D4s_v3``); checked against the region's sizes before creating.
    max_nodes
        The cluster's maximum node count.
    tier
        ``"dedicated"`` or ``"low_priority"``.
    idle_seconds
        How long an idle node stays allocated (and billed) before AML releases it.
    """

    size: str
    max_nodes: int
    tier: str = "dedicated"
    idle_seconds: int = 120


def compute_request(value: Any) -> ComputeRequest | None:
    """Validate ``create_compute``: None, or a mapping with ``size`` and ``max_nodes``.

    Optional keys: ``tier`` (``dedicated`` | ``low_priority``) and
    ``idle_time_before_scale_down`` (a duration, default 120 s).
    """
    if value is None or isinstance(value, ComputeRequest):
        return value
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "create_compute must be a mapping like {'size': 'Standard_D4s_v3', 'max_nodes': 4}, "
            f"got {value!r}."
        )
    data = {str(k).replace("-", "_"): v for k, v in value.items()}
    known = {"size", "max_nodes", "tier", "idle_time_before_scale_down"}
    if set(data) - known:
        raise ConfigurationError(
            f"create_compute: unknown key(s) {', '.join(sorted(set(data) - known))}; "
            f"known: {', '.join(sorted(known))}."
        )
    size = vm_size_name(data.get("size"), "create_compute['size']")
    tier = str(data.get("tier") or "dedicated").lower().replace("-", "_")
    if tier not in ("dedicated", "low_priority"):
        raise ConfigurationError(
            f"create_compute['tier'] must be 'dedicated' or 'low_priority', got {data['tier']!r}."
        )
    idle = parse_duration(
        data.get("idle_time_before_scale_down", 120), "idle_time_before_scale_down"
    )
    if idle is None or idle < 0:
        raise ConfigurationError("create_compute['idle_time_before_scale_down'] must be >= 0.")
    return ComputeRequest(
        size=size,
        max_nodes=positive_int(data.get("max_nodes"), "create_compute['max_nodes']"),
        tier=tier,
        idle_seconds=int(idle),
    )


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


#: Settings that must be set (the schema has no null for them).
_REQUIRED_DURATIONS = (
    "startup_timeout",
    "prepare_timeout",
    "queue_timeout",
    "death_timeout",
    "poll_interval",
    "watch_interval",
)
_OPTIONAL_DURATIONS = ("job_timeout", "idle_timeout", "no_client_timeout")
_BOOLEANS = (
    "worker_on_scheduler",
    "security",
    "ssh_trust_on_first_use",
    "quiet",
    "delete_compute_on_close",
    "serverless_network",
)


def resolve_settings(**arguments: Any) -> ClusterSettings:
    """Merge ``arguments`` (None means "not given") over dask config and validate.

    Every setting is checked here, before anything reaches AML; what can only
    be checked against the workspace (the compute, a registered environment)
    is checked by the cluster right before it submits.

    Parameters
    ----------
    **arguments
        Settings by attribute name (``n_nodes=...``); see :class:`ClusterSettings`.

    Returns
    -------
    ClusterSettings
        The validated, normalised settings.

    Raises
    ------
    ConfigurationError
        A value is missing or invalid; the message names the setting, the bad
        value and what to change.
    TypeError
        An unknown setting was passed.
    """
    unknown = set(arguments) - {f.name for f in fields(ClusterSettings)}
    if unknown:
        raise TypeError(f"Unknown settings: {', '.join(sorted(unknown))}")
    raw = {
        f.name: get(config_key(f.name), override_with=arguments.get(f.name))
        for f in fields(ClusterSettings)
    }
    if raw["workspace_config"] is not None:
        _check_workspace_config(raw["workspace_config"])
    tier = str(raw["job_tier"] or "standard").lower()
    if tier not in ("standard", "spot"):
        raise ConfigurationError(
            f"job_tier must be 'standard' or 'spot' (serverless jobs), not {raw['job_tier']!r}."
        )
    raw["job_tier"] = tier
    raw["instance_type"] = optional_string(raw["instance_type"], "instance_type")
    if raw["instance_type"] is not None:
        _check_serverless(raw)  # serverless: no compute
    else:
        if raw["compute"] is None or raw["compute"] == "":
            # Precedence: argument > dask config (incl. DASK_AMLCOMPUTE__COMPUTE) > the
            # compute cached in the workspace config.json > error.
            from .backend.workspace import cached_compute

            raw["compute"] = cached_compute(raw["workspace_config"])
        if not raw["compute"]:
            raise ConfigurationError(
                "No compute given: pass compute='<AmlCompute name>', set amlcompute.compute "
                "in dask config (DASK_AMLCOMPUTE__COMPUTE), or cache it in the workspace "
                "config.json with dask_amlcompute.write_workspace_config(..., compute=...)."
            )
        if not isinstance(raw["compute"], str) or not raw["compute"].strip():
            raise ConfigurationError(
                "compute must be the name of an AmlCompute target (a string), got "
                f"{raw['compute']!r}."
            )
    for key in ("n_nodes", "nodes_per_job", "processes_per_node"):
        raw[key] = positive_int(raw[key], key)
    if raw["threads_per_process"] is not None:
        raw["threads_per_process"] = positive_int(raw["threads_per_process"], "threads_per_process")
    raw["memory_limit"] = memory_limit(raw["memory_limit"])
    for key in (*_REQUIRED_DURATIONS, *_OPTIONAL_DURATIONS):
        raw[key] = parse_duration(raw[key], key)
    for key in _REQUIRED_DURATIONS:
        if raw[key] is None:
            raise ConfigurationError(f"{key} must be set: every wait is bounded.")
    if raw["distribution"] not in ("pytorch", "mpi"):
        raise ConfigurationError(
            f"distribution must be 'pytorch' or 'mpi', not {raw['distribution']!r}."
        )
    if raw["connect"] not in ("auto", "direct", "job-ssh", "ssh"):
        raise ConfigurationError(
            f"connect must be 'auto', 'direct', 'job-ssh' or 'ssh', not {raw['connect']!r}."
        )
    if raw["name"] is None or raw["name"] == "":
        raw["name"] = default_cluster_name()
    raw["name"] = aml_name(raw["name"], "cluster name")
    raw["experiment_name"] = aml_name(raw["experiment_name"], "experiment_name")
    raw["tags"] = string_mapping(raw["tags"], "tags")
    raw["env_vars"] = env_var_mapping(raw["env_vars"], "env_vars")
    for key in ("scheduler_options", "worker_options"):
        raw[key] = options_mapping(raw[key], key)
    for key in ("scheduler_port", "dashboard_port"):
        raw[key] = port(raw[key], key)
    for key in _BOOLEANS:
        raw[key] = boolean(raw[key], key)
    from .backend.versions import validate_policy

    raw["version_check"] = validate_policy(raw["version_check"])
    raw["environment"] = environment_setting(raw["environment"])
    raw["pip_packages"] = pip_requirements(raw["pip_packages"], "pip_packages")
    raw["conda_packages"] = string_list(raw["conda_packages"], "conda_packages")
    raw["node_package"] = optional_string(raw["node_package"], "node_package")
    raw["ssh_key"] = existing_file(raw["ssh_key"], "ssh_key")
    raw["known_hosts"] = optional_string(raw["known_hosts"], "known_hosts", allow_path=True)
    raw["workspace_config"] = optional_string(
        raw["workspace_config"], "workspace_config", allow_path=True
    )
    if raw["gpu_workers"] not in ("auto", "none"):
        raise ConfigurationError(
            f"gpu_workers must be 'auto' or 'none', not {raw['gpu_workers']!r}."
        )
    raw["worker_compute"] = optional_string(raw["worker_compute"], "worker_compute")
    if raw["worker_compute"] and raw["compute"] is None:
        raise ConfigurationError(
            "worker_compute puts worker jobs on an AmlCompute, but this cluster is serverless "
            "(instance_type=...): its worker jobs cannot reach a serverless scheduler."
        )
    raw["create_compute"] = compute_request(raw["create_compute"])
    if raw["create_compute"] and raw["n_nodes"] > raw["create_compute"].max_nodes:
        raise ConfigurationError(
            f"n_nodes={raw['n_nodes']} is more than create_compute['max_nodes']="
            f"{raw['create_compute'].max_nodes}: the cluster could never start."
        )
    return ClusterSettings(**raw)


def _check_serverless(raw: dict[str, Any]) -> None:
    """Serverless settings: ``instance_type`` without a compute, ``job_tier`` standard | spot."""
    if raw["compute"]:
        raise ConfigurationError(
            f"instance_type={raw['instance_type']!r} runs the cluster as serverless jobs, which "
            f"have no compute; leave compute unset (got compute={raw['compute']!r}), or drop "
            "instance_type to use that compute."
        )
    if raw["create_compute"] is not None or raw["delete_compute_on_close"]:
        raise ConfigurationError(
            "create_compute / delete_compute_on_close are for an AmlCompute cluster; serverless "
            "jobs (instance_type=...) need no compute."
        )
    vm_size_name(raw["instance_type"], "instance_type")
    raw["compute"] = None


def _check_workspace_config(path: Any) -> None:
    """Refuse a ``workspace_config`` that names no config file (or folder holding one)."""
    from .backend.workspace import find_workspace_config

    text = optional_string(path, "workspace_config", allow_path=True)
    if find_workspace_config(text) is None:
        raise ConfigurationError(
            f"workspace_config={text!r}: no workspace config file there (neither a file nor a "
            "folder holding config.json). Download config.json from the workspace's page in "
            "Azure ML studio, write one with dask_amlcompute.write_workspace_config(...), or "
            "leave workspace_config unset to search the current folder and its parents."
        )
