"""Finding the AML workspace: an ``MLClient`` from arguments or a ``config.json``.

The file (from Azure ML studio) is looked for at the given path, else in the current folder,
its parents or ``.azureml/`` beside them; it also caches the compute (``dask_amlcompute.compute``).
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
    p = Path(path).expanduser() if path is not None else Path.cwd().resolve()
    if p.is_file():
        return p
    folders = [p] if path is not None else [p, *p.parents]
    return next((f / n for f in folders for n in CONFIG_NAMES if (f / n).is_file()), None)


#: Where dask-amlcompute keeps its own cached settings inside config.json.
SECTION = "dask_amlcompute"
IDENTITY_KEYS = ("subscription_id", "resource_group", "workspace_name")


@dataclass(frozen=True)
class WorkspaceSettings:
    """Workspace settings cached in a ``config.json`` (``path``), AML's keys and the compute."""

    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    compute: str | None = None  # dask_amlcompute.compute
    path: Path | None = None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"Cannot read workspace config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"Workspace config {path} is not a JSON object.")
    if not isinstance(data.get(SECTION), dict):
        data.pop(SECTION, None)
    return data


def write_workspace_config(
    path: str | os.PathLike,
    *,
    subscription_id: str | None = None,
    resource_group: str | None = None,
    workspace_name: str | None = None,
    compute: str | None = None,
) -> Path:
    """Write (cache) workspace settings in an AML ``config.json``; returns the file.

    Parameters
    ----------
    path
        The file, or a folder for ``<folder>/config.json``; an existing file keeps other keys.
    subscription_id, resource_group, workspace_name
        The workspace; required when the file does not exist yet.
    compute
        AmlCompute name, used when neither the cluster nor dask config names one.

    Examples
    --------
    >>> write_workspace_config(".", subscription_id="...", resource_group="rg",
    ...                        workspace_name="ws", compute="cpu-cluster")  # doctest: +SKIP
    """
    p = Path(path).expanduser()
    p = p / "config.json" if p.is_dir() or not p.suffix else p
    data = _load_json(p) if p.is_file() else {}
    given = zip(IDENTITY_KEYS, (subscription_id, resource_group, workspace_name), strict=True)
    data.update({k: v for k, v in given if v})
    missing = [k for k in IDENTITY_KEYS if not data.get(k)]
    if missing:
        raise ConfigurationError(f"Cannot write {p}: {', '.join(missing)} not given.")
    if compute:
        data[SECTION] = {**data.get(SECTION, {}), "compute": compute}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(p)
    return p


def cache_workspace(
    ml_client: Any, path: str | os.PathLike = ".", compute: str | None = None
) -> Path:
    """Cache an ``MLClient``'s workspace (and a compute) in ``config.json`` under ``path``."""
    return write_workspace_config(
        path,
        subscription_id=ml_client.subscription_id,
        resource_group=ml_client.resource_group_name,
        workspace_name=ml_client.workspace_name,
        compute=compute,
    )


def load_workspace_settings(path: str | os.PathLike | None = None) -> WorkspaceSettings | None:
    """The settings in the workspace config found at ``path`` or from the cwd up, or None."""
    found = find_workspace_config(path)
    if found is None:
        return None
    data = _load_json(found)
    compute = data.get(SECTION, {}).get("compute") or None
    return WorkspaceSettings(**{k: data.get(k) for k in IDENTITY_KEYS}, compute=compute, path=found)


def with_cached_compute(settings: ClusterSettings) -> ClusterSettings:
    """``settings`` with the compute cached in the workspace config when none was given.

    Precedence: ``compute=``, dask config (``DASK_AMLCOMPUTE__COMPUTE``), ``config.json``;
    serverless (``instance_type``) needs none.
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
    if not (compute := getattr(load_workspace_settings(path), "compute", None)):
        raise ConfigurationError(
            "No compute given: pass compute='<AmlCompute name>', set amlcompute.compute "
            "in dask config (DASK_AMLCOMPUTE__COMPUTE), or cache it in the workspace "
            "config.json with dask_amlcompute.write_workspace_config(..., compute=...)."
        )
    return replace(settings, compute=checked("compute", compute))


def workspace_client(ml_client: Any, path: Any = None, credential: Any = None) -> Any:
    """``ml_client`` if it is an ``MLClient``; None: one from the workspace config file."""
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
    """An ``MLClient`` from a workspace config file (``MLClient.from_config``).

    Parameters
    ----------
    path
        The config file, or a folder holding one; None searches from the current folder up.
    credential
        Azure credential; default ``DefaultAzureCredential()``.
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
        return MLClient.from_config(credential, path=found)
    except ValidationException as exc:  # the file lacks subscription_id, resource_group, ...
        raise WorkspaceNotConfiguredError(f"{found}: {exc.message}") from None
    except ValueError as exc:  # not JSON
        raise ConfigurationError(f"Cannot read workspace config {found}: {exc}") from None
