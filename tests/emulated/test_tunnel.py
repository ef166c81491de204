"""Tests for the client-side SSH tunnel (real asyncssh server, loopback TCP only)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from pathlib import Path

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
from dask_amlcompute.connect.hostkeys import resolve_client_keys
from dask_amlcompute.connect.tunnel import SSHTunnel
from dask_amlcompute.exceptions import (
    ConfigurationError,
    ForwardingError,
    HostKeyError,
    TunnelAuthenticationError,
    TunnelError,
    TunnelUnreachableError,
)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure no test reads or writes the real ~/.ssh or talks to an ssh-agent."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def port_is_free(port: int) -> bool:
    """Return whether ``127.0.0.1:port`` can be bound again."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT, like servers
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def make_tunnel(srv: NodeSSHServer, key: object, targets: dict, **kwargs: object) -> SSHTunnel:
    """An SSHTunnel to ``srv`` trusting its host key (in memory) unless told otherwise."""
    options: dict[str, object] = {"known_hosts": [srv.host_public_key], "client_keys": key}
    options.update(kwargs)
    return SSHTunnel(srv.host, srv.port, ADMIN, targets=targets, **options)  # type: ignore[arg-type]


async def roundtrip(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, half-close, and return everything read back until EOF."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("python", ["3.11.7", "3.11.2"])
def test_echo_through_two_targets(python: str) -> None:
    async def body() -> None:
        async with echo_server() as (p1, _), echo_server() as (p2, _), node_server() as (srv, key):
            targets = {"scheduler": (NODE_IP, p1), "dashboard": (NODE_IP, p2)}
            async with make_tunnel(srv, key, targets) as tunnel:
                a1, a2 = tunnel.local_address("scheduler"), tunnel.local_address("dashboard")
                assert a1[0] == a2[0] == "127.0.0.1" and a1[1] != a2[1]
                big = bytes(range(256)) * 16384  # 4 MiB: exercises SSH window flow control
                results = await asyncio.gather(
                    roundtrip(a1, b"hello"), roundtrip(a2, b"dashboard"), roundtrip(a1, big)
                )
                assert results == [b"hello", b"dashboard", big]
                assert tunnel.reconnects == 0
                with pytest.raises(KeyError, match="targets"):
                    tunnel.local_address("nope")

    with transports_of(python):
        run(body)


@pytest.mark.parametrize("python", ["3.11.7", "3.11.2"])
def test_dask_client_reaches_scheduler_through_tunnel(python: str) -> None:
    from distributed import Client, Scheduler

    async def body() -> None:
        async with Scheduler(host=NODE_IP, port=0, dashboard_address=":0") as scheduler:
            dash_port = scheduler.http_server.port
            async with node_server() as (srv, key):
                targets = {
                    "scheduler": (NODE_IP, scheduler.port),
                    "dashboard": (NODE_IP, dash_port),
                }
                async with make_tunnel(srv, key, targets) as tunnel:
                    url = "tcp://{}:{}".format(*tunnel.local_address("scheduler"))
                    async with Client(url, asynchronous=True, timeout="10s") as client:
                        assert client.scheduler_info()["id"] == scheduler.id
                        identity = await client.scheduler.identity()
                        assert identity["address"] == scheduler.address
                        assert await client.run_on_scheduler(lambda: 6 * 7) == 42
                    reader, writer = await asyncio.open_connection(
                        *tunnel.local_address("dashboard")
                    )
                    writer.write(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    response = await asyncio.wait_for(reader.read(), 10)
                    writer.close()
                    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"ok")

    with transports_of(python):
        run(body, timeout=20)


def test_wrong_client_key_is_refused() -> None:
    async def body() -> None:
        async with node_server() as (srv, _key):
            other_key, _ = generate_client_keypair()
            tunnel = make_tunnel(srv, other_key, {"scheduler": (NODE_IP, 8786)})
            with pytest.raises(TunnelAuthenticationError) as info:
                await tunnel.start()
            assert isinstance(info.value, TunnelError) and isinstance(info.value, ConnectionError)
            assert "does not accept this key" in str(info.value)
            assert "ssh_key=" in str(info.value)
            await tunnel.close()

    run(body)


def test_unknown_host_key_then_trust_on_first_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known_hosts = tmp_path / "known_hosts"

    async def body() -> None:
        async with echo_server() as (port, _), node_server() as (srv, key):
            targets = {"scheduler": (NODE_IP, port)}
            fingerprint = asyncssh.import_public_key(srv.host_public_key).get_fingerprint()

            strict = make_tunnel(srv, key, targets, known_hosts=known_hosts)
            with pytest.raises(HostKeyError, match="not in known_hosts") as info:
                await strict.start()
            assert fingerprint in str(info.value) and "trust_on_first_use=True" in str(info.value)
            assert not known_hosts.exists()

            with caplog.at_level(logging.WARNING, logger="dask_amlcompute.connect.tunnel"):
                async with make_tunnel(
                    srv, key, targets, known_hosts=str(known_hosts), trust_on_first_use=True
                ) as tofu:
                    assert await roundtrip(tofu.local_address("scheduler"), b"x") == b"x"
            assert fingerprint in caplog.text
            assert known_hosts.read_text().splitlines() == [srv.known_hosts_line()]
            assert known_hosts.stat().st_mode & 0o077 == 0

            async with make_tunnel(srv, key, targets, known_hosts=known_hosts) as again:
                assert await roundtrip(again.local_address("scheduler"), b"y") == b"y"
            assert known_hosts.read_text().splitlines() == [srv.known_hosts_line()]

    run(body)


def test_mismatched_host_key_is_refused_even_with_tofu(tmp_path: Path) -> None:
    async def body() -> None:
        async with node_server() as (srv, key):
            impostor = NodeSSHServer(host=srv.host, port=srv.port, host_key=generate_host_key())
            known_hosts = tmp_path / "known_hosts"
            known_hosts.write_text("# comment\n" + impostor.known_hosts_line())  # no final newline
            for tofu in (False, True):
                tunnel = make_tunnel(
                    srv, key, {"s": (NODE_IP, 1)}, known_hosts=known_hosts, trust_on_first_use=tofu
                )
                with pytest.raises(HostKeyError, match="man-in-the-middle"):
                    await tunnel.start()
            assert known_hosts.read_text() == "# comment\n" + impostor.known_hosts_line()

            in_memory = make_tunnel(
                srv, key, {"s": (NODE_IP, 1)}, known_hosts=[impostor.host_public_key]
            )
            with pytest.raises(HostKeyError, match="man-in-the-middle"):
                await in_memory.start()

    run(body)


def test_unreachable_endpoint_fails_fast() -> None:
    async def body() -> None:
        _private, _ = generate_client_keypair()
        tunnel = SSHTunnel(
            "127.0.0.1", free_port(), ADMIN, client_keys=_private, known_hosts=[],
            targets={"scheduler": (NODE_IP, 8786)}, connect_timeout=3,
        )  # fmt: skip
        started = time.monotonic()
        with pytest.raises(TunnelUnreachableError, match="remote login enabled"):
            await tunnel.start()
        assert time.monotonic() - started < 4
        await tunnel.close()

    run(body)


def test_forwarding_refused_by_server() -> None:
    async def body() -> None:
        async with node_server() as (srv, key):
            tunnel = make_tunnel(srv, key, {"scheduler": ("127.0.1.2", 8786)})
            with pytest.raises(ForwardingError, match="refused to forward"):
                await tunnel.start()

    run(body)


def test_reconnects_after_server_restart(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        host_key = generate_host_key()
        async with echo_server() as (port, _), node_server(host_key=host_key) as (srv, key):
            public = asyncssh.import_private_key(key).export_public_key().decode()
            tunnel = make_tunnel(srv, key, {"scheduler": (NODE_IP, port)}, reconnect_delay=0.1)
            async with tunnel:
                address = tunnel.local_address("scheduler")
                assert await roundtrip(address, b"before") == b"before"
                await srv.close()
                await asyncio.sleep(0.3)
                async with node_server(
                    port=srv.port, host_key=host_key, authorized_keys=[public]
                ) as (restarted, _):
                    assert restarted.port == srv.port
                    assert await roundtrip(address, b"after") == b"after"
                    assert tunnel.local_address("scheduler") == address
                    assert tunnel.reconnects == 1

    with caplog.at_level(logging.WARNING, logger="dask_amlcompute.connect.tunnel"):
        run(body)
    assert "dropped; reconnecting" in caplog.text and "re-established" in caplog.text


def test_gives_up_after_bounded_retries(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with echo_server() as (port, _), node_server() as (srv, key):
            tunnel = make_tunnel(
                srv, key, {"scheduler": (NODE_IP, port)}, reconnect_attempts=2,
                reconnect_delay=0.05, connect_timeout=2,
            )  # fmt: skip
            async with tunnel:
                await srv.close()
                for _ in range(100):
                    if "gave up" in caplog.text:
                        break
                    await asyncio.sleep(0.05)
                started = time.monotonic()
                with contextlib.suppress(ConnectionResetError):  # unread data: RST, else EOF
                    assert await roundtrip(tunnel.local_address("scheduler"), b"lost") == b""
                assert time.monotonic() - started < 1
                assert tunnel.reconnects == 0

    with caplog.at_level(logging.WARNING, logger="dask_amlcompute.connect.tunnel"):
        run(body)
    assert "Reconnection attempt 2/2" in caplog.text and "gave up reconnecting" in caplog.text


def test_reconnect_refuses_a_changed_host_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known_hosts = tmp_path / "known_hosts"

    async def body() -> None:
        async with echo_server() as (port, _), node_server() as (srv, key):
            public = asyncssh.import_private_key(key).export_public_key().decode()
            tunnel = make_tunnel(
                srv, key, {"scheduler": (NODE_IP, port)}, known_hosts=known_hosts,
                trust_on_first_use=True, reconnect_delay=0.05,
            )  # fmt: skip
            async with tunnel:
                await srv.close()
                async with node_server(port=srv.port, authorized_keys=[public]):  # new host key
                    for _ in range(100):
                        if "gave up" in caplog.text:
                            break
                        await asyncio.sleep(0.05)
                    with contextlib.suppress(ConnectionResetError):
                        assert await roundtrip(tunnel.local_address("scheduler"), b"x") == b""
                    assert tunnel.reconnects == 0
            assert known_hosts.read_text().splitlines() == [srv.known_hosts_line()]

    with caplog.at_level(logging.WARNING, logger="dask_amlcompute.connect.tunnel"):
        run(body)
    assert "man-in-the-middle" in caplog.text and "gave up reconnecting" in caplog.text
    assert "Reconnection attempt" not in caplog.text  # no retries on a host key mismatch


def test_close_is_idempotent_and_frees_ports() -> None:
    async def body() -> None:
        async with echo_server() as (port, _), node_server() as (srv, key):
            tunnel = make_tunnel(srv, key, {"a": (NODE_IP, port), "b": (NODE_IP, port)})
            await tunnel.start()
            ports = [tunnel.local_address(n)[1] for n in ("a", "b")]
            reader, writer = await asyncio.open_connection(*tunnel.local_address("a"))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            started = time.monotonic()
            await tunnel.close()
            await tunnel.close()
            assert time.monotonic() - started < 2
            assert await asyncio.wait_for(reader.read(), 2) == b""  # open forward was closed
            writer.close()
            assert all(port_is_free(p) for p in ports)
            assert not srv._connections or all(c.is_closed() for c in srv._connections)
            with pytest.raises(KeyError):
                tunnel.local_address("a")

    run(body)


def test_resolve_client_keys(tmp_path: Path) -> None:
    private, public = generate_client_keypair()
    path = tmp_path / "id_ed25519"
    path.write_text(private)
    assert resolve_client_keys(None) is None
    from_text, from_path, from_key = resolve_client_keys(
        [private, path, asyncssh.import_private_key(private)]
    )
    expected = asyncssh.import_public_key(public).public_data
    assert from_text.public_data == from_path.public_data == from_key.public_data == expected
    assert len(resolve_client_keys(str(path))) == 1
    with pytest.raises(ConfigurationError, match="Cannot read"):
        resolve_client_keys(tmp_path / "missing")
    encrypted = asyncssh.import_private_key(private).export_private_key("pkcs8-pem", "secret")
    with pytest.raises(ConfigurationError, match="passphrase"):
        resolve_client_keys(encrypted)
    with pytest.raises(ConfigurationError):
        resolve_client_keys([])
    with pytest.raises(ConfigurationError, match="not an OpenSSH public key"):
        SSHTunnel("127.0.0.1", 22, targets={"s": (NODE_IP, 1)}, known_hosts=["garbage"])
    with pytest.raises(ConfigurationError, match="target"):
        SSHTunnel("127.0.0.1", 22, targets={})


def test_key_fingerprint_of_a_key_pair_matches_the_key() -> None:
    # load_keypairs() gives SSHKeyPair objects, which have no get_fingerprint(): the refused-
    # login message used to raise AttributeError for them instead of TunnelAuthenticationError.
    from dask_amlcompute.connect.hostkeys import key_fingerprint

    key = asyncssh.generate_private_key("ssh-ed25519")
    (pair,) = asyncssh.load_keypairs([key])
    assert not hasattr(pair, "get_fingerprint")
    assert key_fingerprint(pair) == key.get_fingerprint()
