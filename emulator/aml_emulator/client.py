"""Credential, transport and ``MLClient`` factory that point the real SDK at the emulator.

The azure-ai-ml SDK builds its URLs from the Azure public cloud metadata
(``https://management.azure.com`` for ARM, a discovery document for the data
plane).  Rather than changing process-wide state (environment variables, cloud
registrations), :class:`EmulatorTransport` rewrites the scheme, host and port
of every outgoing request to the emulator's address, keeping path and query.
Requests already addressed to the emulator pass unchanged.  Nothing sent
through this transport can leave the machine.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport

from . import identity

#: Header carrying the host the SDK originally addressed (for debugging only).
ORIGINAL_HOST_HEADER = "x-emulator-original-host"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class EmulatorCredential:
    """A token credential that needs no Azure login.

    ``get_token`` returns an unsigned JWT carrying the claims the SDK reads
    (``tid``, ``oid``, ``aud``); the emulator does not verify it.
    """

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        """Return a fresh unsigned token.

        Parameters
        ----------
        *scopes
            Requested scopes; the first one's resource becomes ``aud``.
        **kwargs
            Ignored (``claims``, ``tenant_id``, ...).

        Returns
        -------
        azure.core.credentials.AccessToken
            Token valid for one hour.
        """
        now = int(time.time())
        audience = scopes[0].removesuffix("/.default") if scopes else "https://management.azure.com"
        claims = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{identity.TENANT_ID}/",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "tid": identity.TENANT_ID,
            "oid": "00000000-0000-0000-0000-0000000000bb",
            "upn": "emulator@localhost",
            "name": "AML emulator user",
        }
        header = {"alg": "none", "typ": "JWT"}
        token = ".".join(
            [_b64url(json.dumps(header).encode()), _b64url(json.dumps(claims).encode()), ""]
        )
        return AccessToken(token, now + 3600)

    def close(self) -> None:
        """Do nothing (credential protocol)."""

    def __enter__(self) -> EmulatorCredential:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmulatorTransport(RequestsTransport):
    """A requests transport that sends every request to the emulator.

    Parameters
    ----------
    base_url
        The emulator's base URL, e.g. ``http://127.0.0.1:8765``.
    **kwargs
        Passed to :class:`azure.core.pipeline.transport.RequestsTransport`
        (``connection_verify`` for a self-signed certificate, timeouts...).
    """

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        parts = urlsplit(base_url)
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        # Never route emulator traffic through a proxy configured in the environment.
        if self.session is not None:
            self.session.trust_env = False

    def open(self) -> None:
        """Open the session without honouring proxy environment variables."""
        super().open()
        if self.session is not None:
            self.session.trust_env = False

    def _rewrite(self, url: str) -> tuple[str, str | None]:
        parts = urlsplit(url)
        if parts.scheme == self._scheme and parts.netloc == self._netloc:
            return url, None
        return urlunsplit((self._scheme, self._netloc, parts.path, parts.query, "")), parts.netloc

    def send(self, request: Any, **kwargs: Any) -> Any:
        """Rewrite the request's address to the emulator, then send it.

        Parameters
        ----------
        request
            The outgoing request, an ``azure.core.rest.HttpRequest`` or
            ``azure.core.pipeline.transport.HttpRequest`` (its URL is rewritten only
            while it is sent).
        **kwargs
            Transport options.

        Returns
        -------
        Any
            The transport response.
        """
        new_url, original = self._rewrite(request.url)
        kwargs.pop("proxies", None)
        if original is None:
            return super().send(request, **kwargs)
        # Rewrite only for the duration of the send: the pipeline (retries, LRO
        # pollers, the https-only bearer-token policy) keeps seeing the URL the
        # SDK built.
        saved_url = request.url
        request.url = new_url
        request.headers[ORIGINAL_HOST_HEADER] = original
        try:
            return super().send(request, **kwargs)
        finally:
            request.url = saved_url


def make_ml_client(
    base_url: str,
    *,
    cert_path: str | None = None,
    subscription_id: str = identity.SUBSCRIPTION_ID,
    resource_group: str = identity.RESOURCE_GROUP,
    workspace_name: str = identity.WORKSPACE_NAME,
    **kwargs: Any,
) -> Any:
    """Build an unmodified ``azure.ai.ml.MLClient`` that talks to the emulator.

    Parameters
    ----------
    base_url
        Emulator base URL.
    cert_path
        PEM certificate to trust when the emulator serves HTTPS.
    subscription_id, resource_group, workspace_name
        Workspace coordinates (default: the emulator's fixed identity).
    **kwargs
        Extra ``MLClient`` keyword arguments (``retry_total``...).

    Returns
    -------
    azure.ai.ml.MLClient
        A client whose every request goes to the emulator.
    """
    from azure.ai.ml import MLClient

    transport_kwargs: dict[str, Any] = {}
    if cert_path:
        transport_kwargs["connection_verify"] = cert_path
        kwargs.setdefault("connection_verify", cert_path)
    kwargs.setdefault("enable_telemetry", False)  # show_progress: the SDK's default, as a user's
    # Short retry back-off: the emulator answers fast and tests inject 429/503.
    kwargs.setdefault("retry_backoff_factor", 0.2)
    kwargs.setdefault("retry_backoff_max", 2)
    return MLClient(
        credential=EmulatorCredential(),
        subscription_id=subscription_id,
        resource_group_name=resource_group,
        workspace_name=workspace_name,
        transport=EmulatorTransport(base_url, **transport_kwargs),
        **kwargs,
    )
