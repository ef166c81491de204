"""Helpers shared by the SSH tests (emulator node endpoint and client tunnel): loopback TCP only.

Importable as ``_ssh_helpers`` from any test (``pythonpath`` in pyproject's pytest settings):
the library's tunnel tests use the emulator's node SSH server too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from asyncio import selector_events
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from aml_emulator.ssh import NodeSSHServer, generate_client_keypair

#: The address the test targets listen on (a loopback address other than 127.0.0.1).
NODE_IP = "127.0.1.1"
ADMIN = "azureuser"


def write_client_key(folder) -> tuple[str, str]:
    """Write a new ed25519 client key into ``folder``; ``(private key path, public key line)``."""
    import os

    private, public = generate_client_keypair(comment="test@dask-amlcompute")
    path = folder / "id_ed25519"
    path.write_text(private)
    os.chmod(path, 0o600)
    return str(path), public


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 15.0) -> None:
    """Run an async test body with a hard timeout."""

    async def main() -> None:
        await asyncio.wait_for(coro_fn(), timeout)

    asyncio.run(main())


@contextlib.contextmanager
def transports_of(python: str) -> Iterator[None]:
    """Socket transports as ``python`` runs them: ``"3.11.7"`` (this one) or ``"3.11.2"``.

    Before 3.11.4 a ``pause_reading()`` made in ``connection_made`` is ignored (CPython
    gh-103607; Debian 12's system Python is 3.11.2): reading starts anyway, so the first
    bytes reach the protocol before it asked for them. The transport's reader registration
    is swapped for that release's code (asyncio's, never the code under test).
    """
    cls = selector_events._SelectorSocketTransport
    original = cls._add_reader

    def add_reader_before_3_11_4(self, fd, callback, *args) -> None:
        if not self._closing:
            self._loop._add_reader(fd, callback, *args)

    if python == "3.11.2":
        cls._add_reader = add_reader_before_3_11_4
    try:
        yield
    finally:
        cls._add_reader = original


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port on ``host`` that was just bound and closed (nothing listens)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def echo_server(
    host: str = NODE_IP,
) -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A TCP echo server that closes after echoing everything up to EOF.

    Yields its port and the list of accepted writers.
    """
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    try:
        yield server.sockets[0].getsockname()[1], writers
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def node_server(**kwargs: object) -> AsyncIterator[tuple[NodeSSHServer, str]]:
    """Start a NodeSSHServer on 127.0.0.1 (any port) with a fresh client key.

    It admits ``ADMIN`` with that key and forwards to ``NODE_IP`` only, unless ``kwargs``
    say otherwise. Yields (server, client private key).
    """
    private, public = generate_client_keypair()
    options: dict[str, object] = {
        "admin_user": ADMIN,
        "authorized_keys": [public],
        "allowed_forward_hosts": {NODE_IP},
    }
    options.update(kwargs)
    srv = NodeSSHServer(**options)  # type: ignore[arg-type]
    await srv.start()
    try:
        yield srv, private
    finally:
        await srv.close()
