"""Where emulated nodes live on the network, and how the emulator reaches into it.

Two modes (``EmulatorConfig.network``):

``"loopback"``
    Every node listens on its own loopback address of this machine
    (``127.{net}.{compute + 1}.{slot + 1}``), which the client can dial: the
    network of a client on the compute's VNet (an AML compute instance).
``"isolated"``
    The nodes of each compute live in a network namespace of their own (see
    :mod:`aml_emulator.netns`): they reach each other (as in a
    VNet) and the emulator's endpoints (bridged in), but the client cannot
    reach them except through the emulator's SSH endpoints, as a laptop
    outside the VNet of a stock workspace.

Everything in the emulator that touches a node's network (starting node
processes, the SSH endpoints' listeners and their forwards) goes through a
:class:`NodeNetwork`, so both modes share one code path.  ``compute=None`` in
:meth:`NodeNetwork.listen` / :meth:`NodeNetwork.connect` names the *public*
side: the emulator's own network, where the client is (the SSH endpoints
listen there and dial their forwards in the compute's network).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

__all__ = [
    "NETWORK_MODES",
    "LoopbackNetwork",
    "NodeNetwork",
    "listen_on",
    "open_connection_socket",
]

#: Values of ``EmulatorConfig.network``.
NETWORK_MODES = ("loopback", "isolated")


def tcp_socket() -> socket.socket:
    """A stream socket of the emulator, created as IPPROTO_TCP.

    asyncio turns Nagle off (TCP_NODELAY, as OpenSSH does for forwarded connections) only on
    sockets whose ``proto`` is IPPROTO_TCP (``base_events._set_nodelay``), and
    ``socket(AF_INET, SOCK_STREAM)`` has proto 0: two small writes then met the peer's delayed
    ACK (~40 ms per task through the job SSH proxy).
    """
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)


class NodeNetwork(Protocol):
    """The network the nodes of the emulator's computes are on."""

    #: ``"loopback"`` or ``"isolated"``.
    mode: str

    async def open(self, compute: str) -> None:
        """Make the compute's network ready for nodes (idempotent)."""

    def command_prefix(self, compute: str) -> list[str]:
        """Argv prefix that runs a node process in the compute's network (``[]``: here).

        Valid once :meth:`open` has returned for ``compute``.
        """

    async def listen(self, compute: str | None, host: str, port: int) -> socket.socket:
        """A non-blocking TCP socket bound to ``host:port``, listening.

        In the compute's network, or in the emulator's own (public) network
        when ``compute`` is None.
        """

    async def connect(
        self, compute: str | None, host: str, port: int, timeout: float
    ) -> socket.socket:
        """A TCP socket connected to ``host:port`` as seen from the compute's network.

        ``compute=None``: as seen from the emulator's own (public) network.

        Raises
        ------
        OSError
            Refused, unreachable, or not connected within ``timeout`` seconds
            (``TimeoutError``).
        """

    async def release(self, compute: str) -> None:
        """Tear down one compute's network, if open (a deleted compute, a finished serverless job)."""

    async def close(self) -> None:
        """Tear down whatever :meth:`open` created (idempotent)."""


def listen_on(sock: socket.socket, host: str, port: int) -> socket.socket:
    """Bind a fresh TCP socket to ``host:port`` and listen, non-blocking; close it on failure.

    Parameters
    ----------
    sock
        An unbound ``AF_INET`` stream socket (its network namespace is the one
        it was created in).
    host, port
        Address to bind (port 0: an ephemeral port).

    Returns
    -------
    socket.socket
        ``sock``, listening.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(100)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection_socket(
    sock: socket.socket, host: str, port: int, timeout: float
) -> socket.socket:
    """Connect an unconnected non-blocking TCP socket, bounded; close it on failure."""
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


class LoopbackNetwork:
    """Nodes on this machine's loopback, reachable by everyone here."""

    mode = "loopback"

    async def open(self, compute: str) -> None:
        """Nothing to prepare."""

    def command_prefix(self, compute: str) -> list[str]:
        """Node processes run in this network namespace."""
        return []

    async def listen(self, compute: str | None, host: str, port: int) -> socket.socket:
        """A listening socket on ``host:port`` of this machine (public and node side alike)."""
        return listen_on(tcp_socket(), host, port)

    async def connect(
        self, compute: str | None, host: str, port: int, timeout: float
    ) -> socket.socket:
        """A socket connected to ``host:port`` of this machine (public and node side alike)."""
        return await open_connection_socket(tcp_socket(), host, port, timeout)

    async def release(self, compute: str) -> None:
        """Nothing to tear down."""

    async def close(self) -> None:
        """Nothing to tear down."""
