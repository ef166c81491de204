"""Fixed identity of the emulated workspace, ARM id and ``systemData`` helpers.

The emulator always pretends to be one workspace in one subscription, so that
tests and demos can hard-code these values.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any

SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "emulator-rg"
WORKSPACE_NAME = "emulator-ws"
REGION = "local"
TENANT_ID = "00000000-0000-0000-0000-0000000000aa"
PROVIDER = "Microsoft.MachineLearningServices"

#: Audiences of an Azure Resource Manager token: the classic resource id (what
#: ``az ml job connect-ssh`` asks for, scope ``https://management.core.windows.net/.default``)
#: and the current one (what azure-ai-ml asks for). Compared without a trailing slash.
ARM_AUDIENCES = ("https://management.core.windows.net", "https://management.azure.com")

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


def operation_url(sub: str, kind: str, op: str, api_version: str) -> str:
    """Return the ARM URL of a long-running operation of the emulated region.

    Parameters
    ----------
    sub
        Subscription id.
    kind
        Collection, e.g. ``"mfeOperationsStatus"``, ``"computeOperationsStatus"``.
    op
        Operation id.
    api_version
        ``api-version`` the client used.

    Returns
    -------
    str
        ``https://management.azure.com/subscriptions/{sub}/providers/
        Microsoft.MachineLearningServices/locations/local/{kind}/{op}?api-version=...``
        (the SDK's transport sends it back to the emulator).
    """
    return (
        f"https://management.azure.com/subscriptions/{sub}/providers/{PROVIDER}/"
        f"locations/{REGION}/{kind}/{op}?api-version={api_version}"
    )


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


def bearer_claims(
    authorization: str | None, audiences: tuple[str, ...] = ARM_AUDIENCES
) -> dict[str, Any] | None:
    """Return the claims of an emulator access token in an ``Authorization`` header.

    The emulator's credential (:class:`~aml_emulator.client.EmulatorCredential`)
    issues unsigned JWTs; there is no signature to verify, so a token is accepted
    when it is a well-formed JWT of the emulated tenant (``tid``), not expired
    (``exp``, ``nbf``) and issued for one of ``audiences`` (``aud``).

    Parameters
    ----------
    authorization
        The header value, ``"Bearer <token>"`` (None: no header).
    audiences
        Accepted ``aud`` values (a trailing ``/`` is ignored).

    Returns
    -------
    dict or None
        The token's claims, or None when the header carries no acceptable token.
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    parts = token.strip().split(".")
    if scheme.lower() != "bearer" or len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, UnicodeError):
        return None
    if not isinstance(claims, dict) or claims.get("tid") != TENANT_ID:
        return None
    now = time.time()
    exp, nbf = claims.get("exp"), claims.get("nbf", 0)
    if not isinstance(exp, (int, float)) or exp <= now:
        return None
    if not isinstance(nbf, (int, float)) or nbf > now + 300:
        return None
    aud = claims.get("aud")
    given = aud if isinstance(aud, list) else [aud]
    wanted = {a.rstrip("/").lower() for a in audiences}
    if not any(isinstance(a, str) and a.rstrip("/").lower() in wanted for a in given):
        return None
    return claims


def run_token(job_name: str, lifetime: float = 30 * 24 * 3600) -> str:
    """A job's ``MLFLOW_TRACKING_TOKEN``: a JWT, as AML's run tokens are.

    ``azureml-mlflow`` decodes the token (without verifying it) to read its
    ``exp`` (``AzureMLTokenAuthentication._get_token_expiry_time`` in
    azureml-mlflow 1.62), so it must be a well-formed JWT. Unsigned, like the
    emulator's ARM tokens; a random ``jti`` makes every job's token unique.

    Parameters
    ----------
    job_name
        The run the token is for.
    lifetime
        Seconds until ``exp``.

    Returns
    -------
    str
        The token.
    """

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode("ascii")

    now = int(time.time())
    claims = {
        "tid": TENANT_ID,
        "aud": "https://ml.azure.com",
        "runId": job_name,
        "iat": now,
        "exp": now + int(lifetime),
        "jti": secrets.token_urlsafe(16),
    }
    return ".".join([b64({"alg": "none", "typ": "JWT"}), b64(claims), ""])


def token_subject(authorization: str | None) -> str | None:
    """Return the object id (``oid``) of the caller of a request, if its token is acceptable.

    Parameters
    ----------
    authorization
        The request's ``Authorization`` header.

    Returns
    -------
    str or None
        The ``oid`` claim of an ARM token of the emulated tenant, else None.
    """
    claims = bearer_claims(authorization)
    oid = claims.get("oid") if claims else None
    return oid if isinstance(oid, str) and oid else None
