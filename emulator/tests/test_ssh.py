"""Tests for the emulator's per-node SSH endpoint (real asyncssh, loopback TCP only)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable

import asyncssh
import pytest
from _ssh_helpers import (
    ADMIN,
    NODE_IP,
    echo_server,
    free_port,
    node_server,
    run,
    transports_of,
)

from aml_emulator.ssh import (
    NodeSSHServer,
    generate_client_keypair,
    generate_host_key,
)

OTHER_IP = "127.0.1.2"


def connect(
    srv: NodeSSHServer,
    private_key: str,
    *,
    username: str = ADMIN,
    known_hosts: str | None = None,
    **kwargs: object,
) -> Awaitable[asyncssh.SSHClientConnection]:
    """Connect a real asyncssh client that trusts only the given known_hosts text."""
    return asyncssh.connect(
        srv.host,
        srv.port,
        username=username,
        client_keys=[asyncssh.import_private_key(private_key)] if private_key else [],
        known_hosts=asyncssh.import_known_hosts(known_hosts or srv.known_hosts_line()),
        agent_path=None,
        config=[],
        **kwargs,
    )


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload))
    finally:
        writer.close()


def test_tunnel_to_allowed_host_echoes() -> None:
    async def body() -> None:
        async with echo_server() as (echo_port, _), node_server() as (srv, key):
            assert srv.port > 0
            async with connect(srv, key) as conn:
                listener = await conn.forward_local_port("127.0.0.1", 0, NODE_IP, echo_port)
                payload = b"hello dask " * 1000
                assert await roundtrip(listener.get_port(), payload) == payload
                assert await roundtrip(listener.get_port(), b"again") == b"again"
                listener.close()

    run(body)


@contextlib.asynccontextmanager
async def greeting_server(greeting: bytes, *, close_after: bool = False) -> AsyncIterator[int]:
    """A TCP server that writes ``greeting`` the moment it accepts (like a Dask scheduler).

    With ``close_after`` it closes right after writing; otherwise it waits for the
    peer to hang up. Yields the port.
    """
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(greeting)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            if not close_after:
                await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, NODE_IP, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


@pytest.mark.parametrize("python", ["3.11.7", "3.11.2"])
def test_forward_delivers_bytes_the_target_sends_first(python: str) -> None:
    """Regression: a target that speaks first (Dask handshake) must not lose its bytes."""
    greeting = b"hello from the scheduler\n" * 100

    async def body() -> None:
        async with node_server() as (srv, key), connect(srv, key) as conn:
            async with greeting_server(greeting) as port:
                # direct-tcpip channel, the client never writes anything
                for _ in range(20):
                    reader, writer = await conn.open_connection(NODE_IP, port)
                    assert await asyncio.wait_for(reader.readexactly(len(greeting)), 3) == greeting
                    writer.close()
                # through a local port forward, as the tunnel does
                listener = await conn.forward_local_port("127.0.0.1", 0, NODE_IP, port)
                for _ in range(20):
                    r, w = await asyncio.open_connection("127.0.0.1", listener.get_port())
                    assert await asyncio.wait_for(r.readexactly(len(greeting)), 3) == greeting
                    w.close()
                listener.close()
            # the target writes and hangs up at once: data then EOF both arrive
            async with greeting_server(b"bye", close_after=True) as port:
                for _ in range(20):
                    reader, writer = await conn.open_connection(NODE_IP, port)
                    assert await asyncio.wait_for(reader.read(), 3) == b"bye"
                    writer.close()

    with transports_of(python):
        run(body, timeout=30)


def test_known_hosts_line_and_public_key_format() -> None:
    async def body() -> None:
        async with node_server() as (srv, _):
            line = srv.known_hosts_line()
            assert line == f"[127.0.0.1]:{srv.port} {srv.host_public_key}"
            alg, blob = srv.host_public_key.split(" ")
            assert alg == "ssh-ed25519"
            assert asyncssh.import_public_key(srv.host_public_key).get_algorithm() == alg
            assert blob

    run(body)


def test_given_host_key_is_used_and_keys_differ_per_server() -> None:
    async def body() -> None:
        key = generate_host_key()
        expected = key.export_public_key("openssh").decode().split()[1]
        async with node_server(host_key=key) as (a, _), node_server() as (b, _):
            assert a.host_public_key.split()[1] == expected
            assert a.host_public_key != b.host_public_key
        text_key = key.export_private_key("openssh").decode()
        assert NodeSSHServer(host_key=text_key).host_public_key.split()[1] == expected

    run(body)


def test_wrong_client_key_refused() -> None:
    async def body() -> None:
        other_private, _ = generate_client_keypair()
        async with node_server() as (srv, _):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(srv, other_private)

    run(body)


def test_wrong_user_refused() -> None:
    async def body() -> None:
        async with node_server() as (srv, key):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(srv, key, username="root")

    run(body)


def test_password_auth_refused() -> None:
    async def body() -> None:
        async with node_server() as (srv, _):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(srv, "", password="secret", kbdint_auth=False)

    run(body)


def test_host_key_mismatch_detected_by_client() -> None:
    async def body() -> None:
        impostor = generate_host_key().export_public_key("openssh").decode().strip()
        async with node_server() as (srv, key):
            wrong = f"[127.0.0.1]:{srv.port} {impostor}"
            with pytest.raises(asyncssh.HostKeyNotVerifiable):
                await connect(srv, key, known_hosts=wrong)

    run(body)


def test_forward_to_disallowed_host_refused() -> None:
    async def body() -> None:
        async with (
            echo_server(OTHER_IP) as (echo_port, writers),
            node_server() as (srv, key),
            connect(srv, key) as conn,
        ):
            for host in (OTHER_IP, "127.0.0.1", "localhost"):
                with pytest.raises(asyncssh.ChannelOpenError) as info:
                    await conn.open_connection(host, echo_port)
                assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            assert writers == []  # the server never even connected

    run(body)


def test_forward_to_closed_port_gives_clean_error() -> None:
    async def body() -> None:
        async with node_server() as (srv, key), connect(srv, key) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                await conn.open_connection(NODE_IP, free_port(NODE_IP))
            assert info.value.code == asyncssh.OPEN_CONNECT_FAILED
            # the SSH connection survives the failed channel
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection(NODE_IP, free_port(NODE_IP))

    run(body)


def test_sessions_and_remote_forwarding_refused() -> None:
    async def body() -> None:
        async with node_server() as (srv, key), connect(srv, key) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, NODE_IP, 1)

    run(body)


def test_close_drops_live_connections_and_frees_port() -> None:
    async def body() -> None:
        private, public = generate_client_keypair()
        srv = NodeSSHServer(authorized_keys=[public], allowed_forward_hosts=[NODE_IP])
        await srv.close()  # closing a never-started server is a no-op
        srv = NodeSSHServer(authorized_keys=[public], allowed_forward_hosts=[NODE_IP])
        await srv.start()
        port = srv.port
        async with echo_server() as (echo_port, writers):
            conn = await connect(srv, private)
            reader, writer = await conn.open_connection(NODE_IP, echo_port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"

            await asyncio.wait_for(srv.close(), 3)
            await asyncio.wait_for(conn.wait_closed(), 3)
            assert await asyncio.wait_for(reader.read(), 3) == b""
            # the forwarded socket to the target was closed too
            for _ in range(100):
                if all(w.is_closing() for w in writers):
                    break
                await asyncio.sleep(0.01)
            assert writers and all(w.is_closing() for w in writers)

        await srv.close()  # idempotent
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
        with pytest.raises(RuntimeError):
            await srv.start()

    run(body)


def test_invalid_authorized_key_rejected_early() -> None:
    with pytest.raises(ValueError, match="Invalid authorized key"):
        NodeSSHServer(authorized_keys=["ssh-ed25519 not-base64!"])
