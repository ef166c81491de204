"""Carry an SSH connection through Azure ML's job-service WebSocket proxy.

``ml_client.jobs.show_services(job, node_index)`` names a node's ``ProxyEndpoint``
(``wss://ssh-<id>.<region>.nodes.azureml.ms``); a client opens a WebSocket to
``{ProxyEndpoint}/nbip/v1.0/ws-tcp`` with ``Authorization: Bearer <ARM token>``
and binary frames carry the raw SSH bytes to the daemon in the job's container,
as ``az ml job connect-ssh`` does (Azure/azure-cli-extensions,
``azext_mlv2/manual/custom/_ssh_connector.py``: 4 KiB binary frames, no subprotocol).
:func:`open_proxy_tunnel` returns the WebSocket as an ``asyncssh.connect(tunnel=)``
object, asyncssh's hook for SSH over any transport (ronf/asyncssh#429, #625).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from typing import Any

from ..exceptions import TunnelAuthenticationError, TunnelUnreachableError

logger = logging.getLogger(__name__)

__all__ = ["PROXY_PATH", "TOKEN_SCOPE", "open_proxy_tunnel", "proxy_url"]

#: Path of the TCP relay under a job service's ProxyEndpoint.
PROXY_PATH = "/nbip/v1.0/ws-tcp"
#: Scope of the bearer token the proxy accepts (ARM, the classic audience).
TOKEN_SCOPE = "https://management.core.windows.net/.default"
#: Largest chunk sent per frame: both Microsoft clients send 4 KiB; larger frames
#: are untested against AML's proxy, 16 KiB keeps the header overhead negligible.
CHUNK = 16 * 1024
#: Seconds :meth:`WebSocketTunnel.close` may take to send what was written.
CLOSE_FLUSH = 5.0
#: ``ProxyEndpoint`` schemes and the WebSocket schemes they stand for (AML names
#: ``wss://``; azure-dev's ``job_ssh_proxy.go`` also rewrites ``https://``).
_WS_SCHEMES = {"https": "wss", "http": "ws"}


def proxy_url(endpoint: str, node_index: int = 0) -> str:
    """The WebSocket URL of a ``ProxyEndpoint`` (``<nodeIndex>`` filled in, as ``az`` does)."""
    url = endpoint.replace("<nodeIndex>", str(node_index)).rstrip("/") + PROXY_PATH
    scheme, sep, rest = url.partition("://")
    return _WS_SCHEMES.get(scheme.lower(), scheme) + sep + rest


def _ssl_context() -> ssl.SSLContext:
    """Trust ``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE`` if set (as azure-core does), else the system."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    return ssl.create_default_context(cafile=bundle)


async def open_proxy_tunnel(url: str, token: str, timeout: float = 30.0) -> WebSocketTunnel:
    """Open the WebSocket at ``url``; return it as a tunnel for ``asyncssh.connect(tunnel=)``.

    An HTTP(S) proxy named by ``HTTPS_PROXY`` (``wss://``) or ``HTTP_PROXY``
    (``ws://``) is used through ``CONNECT`` unless ``NO_PROXY`` lists the host,
    as azure-core does for the SDK's own calls.

    Parameters
    ----------
    url
        ``wss://.../nbip/v1.0/ws-tcp`` (see :func:`proxy_url`).
    token
        An access token for :data:`TOKEN_SCOPE`; it goes only into the
        ``Authorization`` header, never into a log.
    timeout
        Bound on the proxy's ``CONNECT``, TLS and the WebSocket handshake.

    Returns
    -------
    WebSocketTunnel
        Carries one SSH connection; closing either closes both.

    Raises
    ------
    TunnelAuthenticationError
        The proxy refused the token (401/403).
    TunnelUnreachableError
        Anything else that kept the WebSocket from opening.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidProxyStatus, InvalidStatus, WebSocketException

    options: dict[str, Any] = {"ssl": _ssl_context()} if url.startswith("wss:") else {}
    where = url.split("?")[0]
    try:
        ws = await asyncio.wait_for(
            connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=timeout,
                ping_interval=30.0,  # as az's Go client
                max_size=16 << 20,
                compression=None,  # as az: raw SSH bytes, no permessage-deflate
                **options,
            ),
            timeout + 5,
        )
    except InvalidStatus as exc:
        code = exc.response.status_code
        if code in (401, 403):
            raise TunnelAuthenticationError(
                f"AML's job-service proxy refused the connection ({code}): only the job's "
                "owner may connect to its SSH service; use the credential of the identity that "
                "submitted the job."
            ) from None
        raise TunnelUnreachableError(
            f"AML's job-service proxy {where} answered {code} {exc.response.reason_phrase}"
        ) from None
    except InvalidProxyStatus as exc:
        raise TunnelUnreachableError(
            f"The HTTP proxy (HTTPS_PROXY/HTTP_PROXY) refused CONNECT to {where}: "
            f"{exc.response.status_code} {exc.response.reason_phrase}"
        ) from None
    except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
        raise TunnelUnreachableError(
            f"Cannot open AML's job-service proxy {where}: {exc or type(exc).__name__}"
        ) from exc
    return WebSocketTunnel(ws)


class WebSocketTunnel(asyncio.Transport):
    """An SSH connection's transport over a WebSocket (asyncssh's ``tunnel=`` protocol).

    Writes are gathered while a frame is being sent and go out as frames of at
    most :data:`CHUNK` bytes; received frames go to asyncssh as they come.
    asyncssh bounds what is buffered here by its SSH channel windows. ``close``
    sends what was written first (within :data:`CLOSE_FLUSH` seconds), ``abort`` drops it.
    """

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self._ws, self._out, self._ready = ws, bytearray(), asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = self._aborted = False

    async def create_connection(self, factory: Any, host: str, port: int) -> tuple[Any, Any]:
        """Start carrying the connection ``factory()`` makes (called by asyncssh once)."""
        protocol = factory()
        protocol.connection_made(self)
        self._task = asyncio.ensure_future(self._relay(protocol))
        return self, protocol

    def write(self, data: Any) -> None:
        if not self.is_closing():
            self._out += data
            self._ready.set()

    def is_closing(self) -> bool:
        return self._closing or self._aborted or bool(self._task and self._task.done())

    def close(self) -> None:
        if self._task is None:
            self.abort()
        elif not self.is_closing():
            self._closing = True
            self._ready.set()  # the relay sends what is left, then ends
            asyncio.get_running_loop().call_later(CLOSE_FLUSH, self.abort)

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        if self._task is None:  # asyncssh never used it
            self._task = asyncio.ensure_future(self._ws.close())
        else:
            self._task.cancel()

    async def _relay(self, protocol: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        async def upstream() -> None:
            while True:
                await self._ready.wait()
                self._ready.clear()
                data, self._out = memoryview(self._out), bytearray()
                for start in range(0, len(data), CHUNK):
                    await self._ws.send(data[start : start + CHUNK])
                if self._closing and not self._out:
                    return

        async def downstream() -> None:
            async for message in self._ws:
                protocol.data_received(message.encode() if isinstance(message, str) else message)

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(ConnectionClosed, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._ws.close(), 5)
            logger.debug("job-service proxy connection closed")
            protocol.connection_lost(None)
