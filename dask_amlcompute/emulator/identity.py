"""Fixed identity of the emulated workspace, ARM id and ``systemData`` helpers.

The emulator always pretends to be one workspace in one subscription, so that
tests and demos can hard-code these values.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "emulator-rg"
WORKSPACE_NAME = "emulator-ws"
REGION = "local"
TENANT_ID = "00000000-0000-0000-0000-0000000000aa"
PROVIDER = "Microsoft.MachineLearningServices"

#: Host names the SDK addresses that the emulator transport redirects to itself.
#: The discovery document points the data-plane clients at ``API_HOST``.
API_HOST = "local.api.azureml.ms"


def workspace_id() -> str:
    """Return the ARM id of the emulated workspace.

    Returns
    -------
    str
        ``/subscriptions/{s}/resourceGroups/{rg}/providers/.../workspaces/{ws}``.
    """
    return (
        f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{RESOURCE_GROUP}"
        f"/providers/{PROVIDER}/workspaces/{WORKSPACE_NAME}"
    )


def child_id(kind: str, name: str, *rest: str) -> str:
    """Return the ARM id of a workspace child resource.

    Parameters
    ----------
    kind
        Collection name, e.g. ``"jobs"``, ``"computes"``, ``"environments"``.
    name
        Resource name.
    *rest
        Further path segments (e.g. ``"versions", "1"``).

    Returns
    -------
    str
        The ARM id.
    """
    return "/".join([workspace_id(), kind, name, *rest])


def studio_url(job_name: str) -> str:
    """Return a well-formed (fake) Azure ML studio URL for a job.

    Parameters
    ----------
    job_name
        The job name.

    Returns
    -------
    str
        A ``https://ml.azure.com/runs/...`` URL; it does not resolve to anything.
    """
    return f"https://ml.azure.com/runs/{job_name}?wsid={workspace_id()}"


def utcnow_iso(ts: float | None = None) -> str:
    """Return an ISO 8601 UTC timestamp as AML writes them.

    Parameters
    ----------
    ts
        POSIX time; now if omitted.

    Returns
    -------
    str
        e.g. ``2024-05-01T12:00:00.123456+00:00``.
    """
    t = time.time() if ts is None else ts
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


def system_data(created: float, modified: float | None = None) -> dict[str, Any]:
    """Return ARM ``systemData``.

    Parameters
    ----------
    created
        Creation POSIX time.
    modified
        Last modification POSIX time.

    Returns
    -------
    dict
        The ``systemData`` block.
    """
    return {
        "createdAt": utcnow_iso(created),
        "createdBy": "emulator@localhost",
        "createdByType": "User",
        "lastModifiedAt": utcnow_iso(modified or created),
        "lastModifiedBy": "emulator@localhost",
        "lastModifiedByType": "User",
    }
