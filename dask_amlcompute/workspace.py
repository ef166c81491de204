"""Finding the AML workspace: an ``MLClient`` from arguments or a config file.

Mirrors ``MLClient.from_config(DefaultAzureCredential())`` (the R SDK's
``load_workspace_from_config()``): a ``config.json`` with ``subscription_id``,
``resource_group`` and ``workspace_name`` found in the given path, the current
folder or its parents, or ``.azureml/`` beside them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .exceptions import WorkspaceNotConfiguredError

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


def write_workspace_config(
    path: str | os.PathLike,
    *,
    subscription_id: str,
    resource_group: str,
    workspace_name: str,
    compute: str | None = None,
) -> Path:
    """Write (cache) workspace settings as an AML ``config.json``.

    ``compute`` is stored under ``dask_amlcompute.compute`` and used when no
    compute is given to the cluster.
    """
    data: dict[str, Any] = {
        "subscription_id": subscription_id,
        "resource_group": resource_group,
        "workspace_name": workspace_name,
    }
    if compute:
        data["dask_amlcompute"] = {"compute": compute}
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    p.write_text(json.dumps(data, indent=2) + "\n")
    return p


def read_workspace_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a workspace config file."""
    data = json.loads(Path(path).read_text())
    missing = [
        k for k in ("subscription_id", "resource_group", "workspace_name") if not data.get(k)
    ]
    if missing:
        raise WorkspaceNotConfiguredError(f"{path} lacks {', '.join(missing)}.")
    return data


def ml_client_from_config(path: str | os.PathLike | None = None, credential: Any = None) -> Any:
    """Build an ``MLClient`` from a workspace config file and ``DefaultAzureCredential``.

    Raises
    ------
    WorkspaceNotConfiguredError
        No config file was found; the message says how to make one.
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
    data = read_workspace_config(found)
    from azure.ai.ml import MLClient

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return MLClient(
        credential,
        subscription_id=data["subscription_id"],
        resource_group_name=data["resource_group"],
        workspace_name=data["workspace_name"],
    )
