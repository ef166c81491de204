"""dask-amlcompute's settings: dask config defaults and schema, and one validated settings object.

``amlcompute.yaml`` fills in dask's defaults at import; each setting is
``dask.config.get("amlcompute.<key>", override_with=arg)`` checked against
``amlcompute-schema.yaml``. Nothing here reads the workspace.
"""

from __future__ import annotations

import difflib
import functools
import getpass
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import dask.config
import yaml

from .exceptions import ConfigurationError
from .validation import (
    MAX_WORKERS,
    environment_setting,
    existing_file,
    memory_limit,
    parse_duration,
    pip_requirements,
)

_HERE = os.path.dirname(__file__)
DEFAULTS_FILE = os.path.join(_HERE, "amlcompute.yaml")
SCHEMA_FILE = os.path.join(_HERE, "amlcompute-schema.yaml")


def cache_dir() -> Path:
    """The folder dask-amlcompute caches things in (snapshots, emulator downloads).

    ``$DASK_AMLCOMPUTE_CACHE``, else ``$XDG_CACHE_HOME/dask-amlcompute``, else
    ``~/.cache/dask-amlcompute``; created by whoever writes into it.
    """
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("DASK_AMLCOMPUTE_CACHE") or xdg / "dask-amlcompute")


@functools.cache
def ensure_defaults() -> None:
    """Merge the package defaults into dask.config (once)."""
    with open(DEFAULTS_FILE) as f:
        dask.config.update_defaults(yaml.safe_load(f))


@dataclass(frozen=True)
class ClusterSettings:
    """Every setting of an :class:`~dask_amlcompute.AmlComputeCluster`, validated.

    Durations are in seconds. Meanings: ``amlcompute-schema.yaml``; defaults: ``amlcompute.yaml``.
    """

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
    tags: dict[str, str]
    env_vars: dict[str, str]
    distribution: str
    scheduler_port: int
    dashboard_port: int
    death_timeout: float
    idle_timeout: float | None
    no_client_timeout: float | None
    first_contact_timeout: float | None
    connect: str
    security: bool
    ssh_key: str | None
    known_hosts: str | None
    ssh_trust_on_first_use: bool
    scheduler_options: dict[str, Any]
    worker_options: dict[str, Any]
    poll_interval: float
    watch_interval: float
    workspace_config: str | None
    pip_packages: list[str]
    conda_packages: list[str]
    node_package: str | None
    stack: str
    version_check: str
    quiet: bool
    prepare_timeout: float
    queue_timeout: float
    create_compute: ComputeRequest | None
    delete_compute_on_close: bool
    instance_type: str | None
    job_tier: str
    serverless_network: bool
    worker_compute: str | None
    gpu_workers: str


@dataclass(frozen=True)
class ComputeRequest:
    """``create_compute=``: an AmlCompute with 0 nodes at rest, idle ones kept ``idle_seconds``."""

    size: str
    max_nodes: int
    tier: str = "dedicated"
    idle_seconds: int = 120


def compute_request(value: Any, what: str = "create_compute") -> ComputeRequest | None:
    """``create_compute`` (None, or a mapping; the schema's ``compute-request``) as a request."""
    if value is None:
        return None
    if isinstance(value, Mapping):  # "max-nodes" or "max_nodes", "low-priority" or "Low_Priority"
        value = {str(k).replace("-", "_"): v for k, v in value.items()}
        if isinstance(value.get("tier"), str):
            value["tier"] = value["tier"].lower().replace("-", "_")
    _check(_validator("compute-request"), value, what)
    idle = parse_duration(value.get(key := "idle_time_before_scale_down", 120), f"{what}[{key!r}]")
    return ComputeRequest(
        value["size"], value["max_nodes"], value.get("tier", "dedicated"), int(idle or 0)
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


# -- the schema ------------------------------------------------------------------------


@functools.cache
def _schema_file() -> dict[str, Any]:
    with open(SCHEMA_FILE) as f:
        return yaml.safe_load(f)


def schema() -> dict[str, Any]:
    """The schema entry of every ``amlcompute.*`` key (``amlcompute-schema.yaml``), by key."""
    return _schema_file()["properties"]["amlcompute"]["properties"]


#: How a schema type reads in an error message.
_TYPE_WORDS = {
    "string": "a string",
    "integer": "an int",
    "number": "a finite number",
    "boolean": "True or False",
    "object": "a mapping (dict)",
    "array": "a list",
    "null": "None",
}
#: The checks a schema cannot say, by the name the schema's ``check`` keyword gives.
CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "memory-limit": memory_limit,
    "pip": pip_requirements,
    "mapping": lambda value, what: dict(value or {}),  # None: no entries
    "file": existing_file,
    "environment": environment_setting,
    "create-compute": compute_request,
}


@functools.cache
def _validator(key: str) -> Any:
    """The jsonschema validator of setting (or schema definition) ``key``."""
    # imported here: the nodes import this module too
    from jsonschema import Draft202012Validator, validators

    # JSON Schema types as Python has them: an int is no float or bool; mappings, tuples count
    types = Draft202012Validator.TYPE_CHECKER.redefine_many(
        {
            "integer": lambda _, x: isinstance(x, int) and not isinstance(x, bool),
            "number": lambda _, x: (
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            ),  # as in JSON: no NaN or infinity
            "object": lambda _, x: isinstance(x, Mapping),
            "array": lambda _, x: isinstance(x, list | tuple),
        }
    )
    entry = {"definitions": _schema_file()["definitions"]}  # for $ref
    entry.update(schema().get(key) or entry["definitions"][key])
    return validators.extend(Draft202012Validator, type_checker=types)(entry)


def _check(validator: Any, value: Any, what: str) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is not None:
        raise _refusal(what, error)


def _refusal(what: str, error: Any) -> ConfigurationError:
    """The ConfigurationError of a schema violation, naming the setting (and key) and the rule."""
    where = what + "".join(f"[{p!r}]" for p in error.relative_path)
    rule = error.validator_value
    rules = {
        "type": lambda: (
            "must be "
            + " or ".join(_TYPE_WORDS[t] for t in (rule if isinstance(rule, list) else [rule]))
            + f", not {type(error.instance).__name__}"
        ),
        "enum": lambda: "must be one of " + ", ".join(map(repr, rule)),
        "not": lambda: f"must not {rule['$comment']}",
        "pattern": lambda: f"must match {rule}",
        "minimum": lambda: f"must be at least {rule}",
        "maximum": lambda: f"must be at most {rule}",
        "minLength": lambda: f"must have at least {rule} character(s)",
        "maxLength": lambda: f"must have at most {rule} characters",
        "maxProperties": lambda: f"must have at most {rule} entries",
        "maxItems": lambda: f"must have at most {rule} items",
        "required": lambda: "needs " + ", ".join(repr(k) for k in rule if k not in error.instance),
        "additionalProperties": lambda: (
            "has unknown key(s); known: " + ", ".join(error.schema["properties"])
        ),
    }
    text = rules[str(error.validator)]() if error.validator in rules else error.message[:200]
    text += f" ({error.schema['$comment']})" if "$comment" in error.schema else ""
    got = repr(error.instance)
    got = got if len(got) <= 80 else f"{got[:60]}... ({len(got)} characters)"
    return ConfigurationError(f"{where} {text}; got {got}.")


def _refuse_unknown(names: Iterable[str], known: Iterable[str], what: str) -> None:
    """Refuse the first of ``names`` that is not ``known``, naming the closest known one."""
    for name in sorted(set(names) - set(known))[:1]:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigurationError(f"Unknown {what} {name!r}.{hint} (See amlcompute-schema.yaml.)")


def check_config() -> None:
    """Refuse ``amlcompute.*`` dask config keys the schema does not know, naming the closest."""
    ensure_defaults()
    section = dask.config.get("amlcompute", {})
    if not isinstance(section, Mapping):
        raise ConfigurationError(f"dask config 'amlcompute' must be a mapping, got {section!r}.")
    keys = {str(k).replace("_", "-"): v for k, v in section.items()}
    _refuse_unknown(keys, schema(), "dask config key amlcompute.*:")
    for key in set(keys) - {config_key(f) for f in _FIELDS}:  # no setting: read where it applies
        checked(key, keys[key], f"amlcompute.{key}")


def check_arguments(arguments: Mapping[str, Any]) -> None:
    """Refuse unknown settings and bad values among ``arguments`` (None: not given)."""
    _refuse_unknown(arguments, _FIELDS, "setting")
    for name, value in arguments.items():
        if value is not None:
            checked(config_key(name), value)


def checked(key: str, value: Any, what: str | None = None) -> Any:
    """``value`` of setting ``key`` (``n-nodes``) checked against its schema entry, normalised.

    Paths become strings, tuples lists, durations seconds; the schema's ``check``
    has the last word (``mapping``: a dict). ``what`` names it in errors (``n_nodes``).
    """
    what = what or key.replace("-", "_")
    entry = _validator(key).schema  # a config key's, or a definition's (map_batches options)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if key == "job-tier" and isinstance(value, str):
        value = value.lower()  # AML spells it "Spot"
    if key != "environment" or value is None or isinstance(value, str):  # an entity: backend
        _check(_validator(key), value, what)
    if "duration" in entry and value is not None:
        value = parse_duration(value, what, *entry["duration"])
    if isinstance(value, tuple):
        value = list(value)
    return CHECKS[entry["check"]](value, what) if "check" in entry else value


_FIELDS = tuple(f.name for f in fields(ClusterSettings))
#: Settings a serverless cluster (``instance_type``) cannot have, and why.
_NOT_SERVERLESS = {
    "compute": "leave compute unset (serverless jobs have no compute), or drop instance_type",
    "create_compute": "serverless jobs need no compute",
    "delete_compute_on_close": "serverless jobs need no compute",
    "worker_compute": "worker jobs on an AmlCompute cannot reach a serverless scheduler",
}


def resolve_settings(**arguments: Any) -> ClusterSettings:
    """Merge ``arguments`` (None: not given) over dask config; validate every setting.

    What needs the workspace (compute, registered environment) is the plan's.
    Raises ConfigurationError naming the setting, the bad value and what to change.
    """
    check_arguments(arguments)
    check_config()  # (and the package defaults merged)
    raw = {
        name: checked(key, dask.config.get(f"amlcompute.{key}", override_with=arguments.get(name)))
        for name, key in zip(_FIELDS, map(config_key, _FIELDS), strict=True)
    }
    raw["name"] = raw["name"] or default_cluster_name()
    for key in ("n_nodes", "nodes_per_job"):
        if raw[key] * raw["processes_per_node"] > MAX_WORKERS:
            raise ConfigurationError(
                f"{key} x processes_per_node = {raw[key] * raw['processes_per_node']} workers "
                f"per job: more than {MAX_WORKERS}, far beyond what one Dask scheduler serves."
            )
    for key, why in _NOT_SERVERLESS.items():
        if raw[key] and raw["instance_type"] is not None:
            raise ConfigurationError(
                f"{key}={raw[key]!r} with instance_type={raw['instance_type']!r} (serverless): {why}."
            )
    create = raw["create_compute"]
    if create and raw["n_nodes"] > create.max_nodes:
        raise ConfigurationError(
            f"n_nodes={raw['n_nodes']} is more than create_compute['max_nodes']="
            f"{create.max_nodes}: the cluster could never start."
        )
    return ClusterSettings(**raw)
