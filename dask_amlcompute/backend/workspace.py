"""Finding the AML workspace: an ``MLClient`` from arguments or a config file.

A ``config.json`` with ``subscription_id``, ``resource_group`` and
``workspace_name`` (as downloaded from Azure ML studio) is looked for in the
given path, else in the current folder or its parents, or ``.azureml/`` beside
them; ``MLClient.from_config`` builds the client from the file found (the R
SDK's ``load_workspace_from_config()``).

The same file caches dask-amlcompute's own workspace settings (the compute,
under ``dask_amlcompute.compute``). Precedence for the compute: the
``compute=`` argument, then dask config (``amlcompute.compute``,
``DASK_AMLCOMPUTE__COMPUTE``), then ``config.json``; for the workspace: the
``ml_client=`` argument, then ``config.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import ClusterSettings, checked
from ..exceptions import ConfigurationError, WorkspaceNotConfiguredError

CONFIG_NAMES = ("config.json", os.path.join(".azureml", "config.json"))


def find_workspace_config(path: str | os.PathLike | None = None) -> Path | None:
    """The first workspace config file at ``path`` or in the cwd and its parents."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        for name in CONFIG_NAMES:
            if (p / name).is_file():
                return p / name
        return None
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


#: Where dask-amlcompute keeps its own cached settings inside config.json.
SECTION = "dask_amlcompute"
IDENTITY_KEYS = ("subscription_id", "resource_group", "workspace_name")


@dataclass(frozen=True)
class WorkspaceSettings:
    """Workspace settings cached in a ``config.json``.

    Attributes
    ----------
    subscription_id, resource_group, workspace_name
        The AML workspace (AML's own ``config.json`` keys).
    compute
        The cached AmlCompute name (``dask_amlcompute.compute``), if any.
    path
        The file they were read from.
    """

    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    compute: str | None = None
    path: Path | None = None


def _config_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p / "config.json" if p.is_dir() or not p.suffix else p


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"Cannot read workspace config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"Workspace config {path} is not a JSON object.")
    return data


def write_workspace_config(
    path: str | os.PathLike,
    *,
    subscription_id: str | None = None,
    resource_group: str | None = None,
    workspace_name: str | None = None,
    compute: str | None = None,
) -> Path:
    """Write (cache) workspace settings in an AML ``config.json``.

    An existing file is updated, not replaced: keys it already has and that
    are not given here (other tools' settings too) are kept. ``compute`` is
    stored under ``dask_amlcompute.compute`` and used when a cluster is given
    no compute and dask config has none (argument > dask config > config.json).

    Parameters
    ----------
    path
        The file, or a folder for ``<folder>/config.json``; missing folders are created.
    subscription_id, resource_group, workspace_name
        The workspace; required when the file does not exist yet.
    compute
        AmlCompute name to cache.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> write_workspace_config(".", subscription_id="...", resource_group="rg",
    ...                        workspace_name="ws", compute="cpu-cluster")  # doctest: +SKIP
    """
    p = _config_path(path)
    data = _load_json(p) if p.is_file() else {}
    given = dict(
        subscription_id=subscription_id,
        resource_group=resource_group,
        workspace_name=workspace_name,
    )
    data.update({k: v for k, v in given.items() if v})
    missing = [k for k in IDENTITY_KEYS if not data.get(k)]
    if missing:
        raise ConfigurationError(f"Cannot write {p}: {', '.join(missing)} not given.")
    if compute:
        found_section = data.get(SECTION)
        section = found_section if isinstance(found_section, dict) else {}
        data[SECTION] = {**section, "compute": compute}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(p)
    return p


def cache_workspace(
    ml_client: Any, path: str | os.PathLike = ".", compute: str | None = None
) -> Path:
    """Cache an ``MLClient``'s workspace (and a compute) in ``config.json`` under ``path``.

    Later sessions can then call ``AmlComputeCluster()`` with no ``ml_client``
    and no ``compute``.
    """
    return write_workspace_config(
        path,
        subscription_id=ml_client.subscription_id,
        resource_group=ml_client.resource_group_name,
        workspace_name=ml_client.workspace_name,
        compute=compute,
    )


def load_workspace_settings(path: str | os.PathLike | None = None) -> WorkspaceSettings | None:
    """The settings in the workspace config found at ``path`` or from the cwd up.

    Returns None when there is no config file.
    """
    found = find_workspace_config(path)
    if found is None:
        return None
    data = _load_json(found)
    found_section = data.get(SECTION)
    section = found_section if isinstance(found_section, dict) else {}
    return WorkspaceSettings(
        subscription_id=data.get("subscription_id"),
        resource_group=data.get("resource_group"),
        workspace_name=data.get("workspace_name"),
        compute=section.get("compute") or None,
        path=found,
    )


def cached_compute(path: str | os.PathLike | None = None) -> str | None:
    """The compute cached in the workspace config (``dask_amlcompute.compute``), or None."""
    found = load_workspace_settings(path)
    return found.compute if found is not None else None


def with_cached_compute(settings: ClusterSettings) -> ClusterSettings:
    """``settings`` with the compute cached in the workspace config when none was given.

    Also refuses a ``workspace_config`` that names no config file. Serverless
    settings (``instance_type``) need no compute and are returned as they are.

    Raises
    ------
    ConfigurationError
        ``workspace_config`` names no file, or no compute is given anywhere.
    """
    path = settings.workspace_config
    if path is not None and find_workspace_config(path) is None:
        raise ConfigurationError(
            f"workspace_config={path!r}: no workspace config file there (neither a file nor a "
            "folder holding config.json). Download config.json from the workspace's page in "
            "Azure ML studio, write one with dask_amlcompute.write_workspace_config(...), or "
            "leave workspace_config unset to search the current folder and its parents."
        )
    if settings.compute is not None or settings.instance_type is not None:
        return settings
    # Precedence: argument > dask config (incl. DASK_AMLCOMPUTE__COMPUTE) > config.json > error.
    compute = cached_compute(path)
    if not compute:
        raise ConfigurationError(
            "No compute given: pass compute='<AmlCompute name>', set amlcompute.compute "
            "in dask config (DASK_AMLCOMPUTE__COMPUTE), or cache it in the workspace "
            "config.json with dask_amlcompute.write_workspace_config(..., compute=...)."
        )
    return replace(settings, compute=checked("compute", compute))


def workspace_client(ml_client: Any, path: Any = None, credential: Any = None) -> Any:
    """``ml_client`` if it is an ``MLClient``; None: one from the workspace config file.

    Raises
    ------
    ConfigurationError
        ``ml_client`` is something else (a string, a workspace name, ...), or
        ``credential`` is no Azure credential.
    """
    if credential is not None and not hasattr(credential, "get_token"):
        raise ConfigurationError(
            f"credential must be an Azure credential (with get_token), got {credential!r}."
        )
    if ml_client is None:
        return ml_client_from_config(path, credential)
    from azure.ai.ml import MLClient

    if not isinstance(ml_client, MLClient):
        raise ConfigurationError(
            f"ml_client must be an azure.ai.ml.MLClient (or None to read the workspace "
            f"config.json), got {type(ml_client).__name__} {str(ml_client)[:80]!r}."
        )
    return ml_client


def ml_client_from_config(path: str | os.PathLike | None = None, credential: Any = None) -> Any:
    """Build an ``MLClient`` from a workspace config file and ``DefaultAzureCredential``.

    The file is the one :func:`find_workspace_config` finds (the one whose
    cached compute is used too), read by ``MLClient.from_config``.

    Parameters
    ----------
    path
        The config file, or a folder holding one; None searches from the current folder up.
    credential
        Azure credential; default ``DefaultAzureCredential()``.

    Raises
    ------
    WorkspaceNotConfiguredError
        No config file was found, or it lacks the workspace's keys; the message
        says how to make one.
    ConfigurationError
        The file is not JSON.
    """
    found = find_workspace_config(path)
    if found is None:
        raise WorkspaceNotConfiguredError(
            "No MLClient was given and no workspace config.json was found "
            f"({'at ' + str(path) if path else 'in the current folder or its parents'}). "
            "Pass ml_client=MLClient(DefaultAzureCredential(), subscription_id, resource_group, "
            "workspace_name), download config.json from the workspace's page in Azure ML studio, "
            "or write one with dask_amlcompute.write_workspace_config(...)."
        )
    from azure.ai.ml import MLClient
    from azure.ai.ml.exceptions import ValidationException

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    try:
        # azure-core's default retries, as on a client the user builds; the library's
        # calls are retried further, the same way for both (backend.ops.AmlOps._call)
        return MLClient.from_config(credential, path=found)
    except ValidationException as exc:  # the file lacks subscription_id, resource_group, ...
        raise WorkspaceNotConfiguredError(f"{found}: {exc.message}") from None
    except ValueError as exc:  # not JSON
        raise ConfigurationError(f"Cannot read workspace config {found}: {exc}") from None
