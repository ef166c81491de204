"""Carry a TCP byte stream through Azure ML's job-service WebSocket proxy.

AML's job SSH service (``services={"ssh": SshJobService(...)}``) is reached
without any public IP: ``ml_client.jobs.show_services(job, node_index)`` names
the node's ``ProxyEndpoint`` (``wss://ssh-<id>.<region>.nodes.azureml.ms``),
and a client opens a WebSocket to ``{ProxyEndpoint}/nbip/v1.0/ws-tcp`` with
``Authorization: Bearer <ARM token>`` (scope
``https://management.core.windows.net/.default``); binary frames then carry the
raw SSH bytes of a connection to the daemon in the job's container. This is what
``az ml job connect-ssh`` does (public source: Azure/azure-cli-extensions,
``src/machinelearningservices/azext_mlv2/manual/custom/_ssh_connector.py``;
binary frames of at most 4 KiB there, no subprotocol).

:func:`open_proxy_socket` returns one end of a socket pair whose other end is
pumped to and from the WebSocket, so :mod:`asyncssh` runs over it unchanged
(``asyncssh.connect(sock=...)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from typing import Any

from ..exceptions import TunnelAuthenticationError, TunnelUnreachableError

logger = logging.getLogger(__name__)

__all__ = ["PROXY_PATH", "TOKEN_SCOPE", "open_proxy_socket", "proxy_url"]

#: Path of the TCP relay under a job service's ProxyEndpoint.
PROXY_PATH = "/nbip/v1.0/ws-tcp"
#: Scope of the bearer token the proxy accepts (ARM, the classic audience).
TOKEN_SCOPE = "https://management.core.windows.net/.default"
#: Seconds between WebSocket pings (``az``'s Go client pings every 30 s).
PING_INTERVAL = 30.0
#: Largest chunk sent per frame: both Microsoft clients send 4 KiB; larger frames
#: are untested against AML's proxy, 16 KiB keeps the header overhead negligible.
CHUNK = 16 * 1024
#: ``ProxyEndpoint`` schemes and the WebSocket schemes they stand for (AML names
#: ``wss://``; azure-dev's ``job_ssh_proxy.go`` also rewrites ``https://``).
_WS_SCHEMES = {"https": "wss", "http": "ws"}


def proxy_url(endpoint: str, node_index: int = 0) -> str:
    """The WebSocket URL of a ``ProxyEndpoint`` (``<nodeIndex>`` filled in, as ``az`` does)."""
    url = endpoint.replace("<nodeIndex>", str(node_index)).rstrip("/") + PROXY_PATH
    scheme, sep, rest = url.partition("://")
    return _WS_SCHEMES.get(scheme.lower(), scheme) + sep + rest


def _ssl_context() -> ssl.SSLContext:
    """The system's trust store, plus ``REQUESTS_CA_BUNDLE`` (as azure-core's transport)."""
    context = ssl.create_default_context()
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    if bundle:
        context.load_verify_locations(cafile=bundle)
    return context


async def open_proxy_socket(url: str, token: str, timeout: float = 30.0) -> socket.socket:
    """Open the WebSocket at ``url`` and return a socket whose bytes travel through it.

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
    socket.socket
        A connected stream socket; closing it closes the WebSocket, and the
        WebSocket closing closes it.

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
                ping_interval=PING_INTERVAL,
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
    mine, theirs = socket.socketpair()
    for sock in (mine, theirs):
        sock.setblocking(False)
    task = asyncio.ensure_future(_pump(ws, theirs))
    _PUMPS.add(task)
    task.add_done_callback(_PUMPS.discard)
    return mine


#: Running pumps (kept referenced until they end).
_PUMPS: set[asyncio.Task[None]] = set()


async def _pump(ws: Any, sock: socket.socket) -> None:
    """Relay bytes between the local socket and the WebSocket until either side closes."""
    reader, writer = await asyncio.open_connection(sock=sock)

    async def upstream() -> None:  # local socket -> WebSocket
        while data := await reader.read(CHUNK):
            await ws.send(data)

    async def downstream() -> None:  # WebSocket -> local socket
        async for message in ws:
            writer.write(message.encode("utf-8") if isinstance(message, str) else message)
            await writer.drain()

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(ws.close(), 5)
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        logger.debug("job-service proxy connection closed")
