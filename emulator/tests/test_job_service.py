"""AML's job SSH service on the emulator, through the unmodified SDK, and public SSH per slot.

A job declares ``services={"ssh": SshJobService(...)}``; ``ml.jobs.show_services``
names a ``ProxyEndpoint``; a WebSocket to ``{ProxyEndpoint}/nbip/v1.0/ws-tcp`` with
an ARM bearer token carries an asyncssh connection (as ``az ml job connect-ssh``
does). Everything dials loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncssh
import pytest
from _emu_helpers import wait_for, wait_log
from azure.core.exceptions import HttpResponseError
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from aml_emulator import ComputeSpec, Emulator, EnvironmentSpec
from aml_emulator.config import EmulatorConfig
from aml_emulator.jobservice import JOB_SSH_USER, PROXY_PATH
from aml_emulator.ssh import generate_client_keypair

#: Scope of the token ``az ml job connect-ssh`` sends to the proxy.
PROXY_SCOPE = "https://management.core.windows.net/.default"
#: Port of the node's HTTP server reached through the SSH forward.
HTTP_PORT = 8731
#: Seconds an SSH service reports Starting (short, to keep the tests fast).
DELAY = 1.0


@pytest.fixture(scope="module")
def svc_emu(ssh_keypair: tuple[str, str]) -> Any:
    """An emulator with a public-SSH compute kept warm (``svc``) and one scaling down at once."""
    config = EmulatorConfig(
        computes=[
            ComputeSpec(name="svc", max_nodes=2, ssh_public_keys=[ssh_keypair[1]]),
            ComputeSpec(
                name="brief",
                max_nodes=1,
                ssh_public_keys=[ssh_keypair[1]],
                idle_seconds_before_scaledown=1,
            ),
        ],
        environments=[EnvironmentSpec(name="dask-env", version="1")],
        build_environments=False,
        job_service_delay=DELAY,
    )
    with Emulator(config=config) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def svc_ml(svc_emu: Any) -> Any:
    """A real MLClient on ``svc_emu``."""
    return svc_emu.ml_client()


@pytest.fixture(scope="module")
def job_key() -> tuple[str, str]:
    """The key pair a job's SSH service accepts (not the compute's admin key)."""
    return generate_client_keypair("job-service-tests")


def submit(
    ml: Any,
    cmd: str,
    *,
    compute: str = "svc",
    nodes: int = 1,
    distribution: dict | None = None,
    services: dict | None = None,
) -> Any:
    """Submit a command job through the real SDK."""
    from azure.ai.ml import command

    job = command(
        command=cmd,
        compute=compute,
        environment="azureml:dask-env:1",
        instance_count=nodes,
        distribution=distribution,
        services=services,
        experiment_name="job-service-tests",
    )
    return ml.jobs.create_or_update(job)


def ssh_service(public_key: str | None, **kwargs: Any) -> dict:
    from azure.ai.ml.entities import SshJobService

    return {"ssh": SshJobService(ssh_public_keys=public_key, **kwargs)}


def cancel(ml: Any, name: str) -> None:
    ml.jobs.begin_cancel(name).result(timeout=30)


def emulator_token(emu: Any, **claims: Any) -> str:
    """A token of the emulator's credential for the proxy scope, with ``claims`` changed."""
    token = emu.credential().get_token(PROXY_SCOPE).token
    if not claims:
        return token
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(claims)
    payload = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{header}.{payload}.{signature}"


async def open_ws(
    url: str, token: str | None, ssl_options: Any = None
) -> WebSocketClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = HTTPRequest(
        url, headers=headers, connect_timeout=10, request_timeout=10, ssl_options=ssl_options
    )
    return await asyncio.wait_for(websocket_connect(request), 15)


async def ws_status(url: str, token: str | None) -> int:
    """The HTTP status the proxy refuses a WebSocket with (0: it accepted)."""
    try:
        ws = await open_ws(url, token)
    except HTTPClientError as exc:
        return exc.code
    ws.close()
    return 0


@contextlib.asynccontextmanager
async def ws_socket(url: str, token: str, ssl_options: Any = None) -> AsyncIterator[socket.socket]:
    """A socket whose bytes travel as binary frames through the WebSocket at ``url``."""
    ws = await open_ws(url, token, ssl_options)
    mine, theirs = socket.socketpair()
    for s in (mine, theirs):
        s.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=theirs)

    async def upstream() -> None:
        while data := await reader.read(65536):
            await ws.write_message(data, binary=True)

    async def downstream() -> None:
        while (message := await ws.read_message()) is not None:
            assert isinstance(message, bytes)
            writer.write(message)
            await writer.drain()
        writer.close()  # the proxy closed: the SSH client sees EOF

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    try:
        yield mine
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ws.close()
        writer.close()
        mine.close()


def connect_ssh(sock: socket.socket, private_key: str | asyncssh.SSHKey) -> Any:
    key = private_key if isinstance(private_key, asyncssh.SSHKey) else None
    key = key or asyncssh.import_private_key(private_key)
    return asyncssh.connect(
        "jobservice",  # a name for the peer (az uses the ProxyEndpoint); the bytes go to sock
        sock=sock,
        username=JOB_SSH_USER,
        client_keys=[key],
        known_hosts=None,  # the test trusts the container's fresh key
        agent_path=None,
        config=[],
    )


async def http_get_through(conn: asyncssh.SSHClientConnection, host: str, port: int) -> bytes:
    """GET /index.html from ``host:port`` through a local port forward of ``conn`` (bounded)."""
    listener = await conn.forward_local_port("127.0.0.1", 0, host, port)
    try:
        for _ in range(100):
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
                writer.write(b"GET /index.html HTTP/1.0\r\nHost: node\r\n\r\n")
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                if data:
                    return data
            await asyncio.sleep(0.1)
        return b""
    finally:
        listener.close()


def services_of(ml: Any, name: str, rank: int) -> dict | None:
    return ml.jobs.show_services(name, rank)


def test_ssh_service_end_to_end(svc_emu, svc_ml, job_key):
    ml = svc_ml
    private, public = job_key
    # rank 0 serves HTTP on its own address (MASTER_ADDR); rank 1 just stays up
    server = (
        'python -c "import http.server, os, time; '
        "os.environ['NODE_RANK'] == '0' or time.sleep(600); "
        f"http.server.HTTPServer((os.environ['MASTER_ADDR'], {HTTP_PORT}), "
        'http.server.SimpleHTTPRequestHandler).serve_forever()"'
    )
    job = submit(
        ml,
        f"echo hello-job-ssh > index.html; echo serving; {server}",
        nodes=2,
        distribution={"type": "pytorch"},
        services=ssh_service(public, nodes="all"),
    )
    try:
        # The job resource echoes the declared service.
        echoed = ml.jobs.get(job.name).services["ssh"]
        assert echoed.type == "ssh" and echoed.ssh_public_keys == public and echoed.nodes == "all"
        # Starting (before and just after the nodes start), then Running with a ProxyEndpoint.
        first = services_of(ml, job.name, 0)
        assert first is not None and first["ssh"].status == "Starting"
        seen: set[str] = set()

        def running(rank: int) -> Any:
            found = services_of(ml, job.name, rank)
            assert found is not None and set(found) == {"ssh"}
            seen.add(found["ssh"].status)
            return found["ssh"] if found["ssh"].status == "Running" else None

        instance = wait_for(lambda: running(0), 30, "rank 0's SSH service Running")
        assert seen <= {"Starting", "Running"}
        assert instance.type == "SSH" and instance.port == 22 and instance.error is None
        endpoint = instance.properties["ProxyEndpoint"]
        assert endpoint.startswith(svc_emu.base_url.replace("http", "ws", 1) + "/jobservice/")
        endpoint1 = wait_for(lambda: running(1), 30, "rank 1's SSH service").properties[
            "ProxyEndpoint"
        ]
        assert endpoint1 != endpoint
        assert services_of(ml, job.name, 2) is None  # no such node
        wait_log(svc_emu, job.name, 0, "serving")
        daemons = svc_emu.job_service_daemons(job.name)
        assert sorted(d["rank"] for d in daemons) == [0, 1]
        master = svc_emu.job_nodes(job.name)[0]["ip"]
        url, url1 = endpoint + PROXY_PATH, endpoint1 + PROXY_PATH
        token = emulator_token(svc_emu)

        async def scenario() -> bytes:
            # The daemon listens in the node's network on the node's address, never
            # on the emulator's public address.
            assert all(d["ip"] != "127.0.0.1" for d in daemons)
            # Refusals before any byte reaches the daemon.
            assert await ws_status(url, None) == 401
            assert await ws_status(url, "not-a-jwt") == 401
            assert (
                await ws_status(url, emulator_token(svc_emu, aud="https://storage.azure.com"))
                == 401
            )
            assert await ws_status(url, emulator_token(svc_emu, exp=1)) == 401
            assert await ws_status(url, emulator_token(svc_emu, tid="someone-else")) == 401
            other = emulator_token(svc_emu, oid="00000000-0000-0000-0000-0000000000cc")
            assert await ws_status(url, other) == 403
            bogus = url.replace("/jobservice/", "/jobservice/x")
            assert await ws_status(bogus, token) == 404
            # A text frame closes the connection (after the daemon's banner, if it came first).
            ws = await open_ws(url, token)
            await ws.write_message("hello")
            first = await asyncio.wait_for(ws.read_message(), 10)
            assert first is None or (first.startswith(b"SSH-2.0-") and first.endswith(b"\r\n"))
            assert first is None or await asyncio.wait_for(ws.read_message(), 10) is None
            assert ws.close_code == 1003
            # A key the service does not list: refused.
            async with ws_socket(url, token) as sock:
                with pytest.raises(asyncssh.PermissionDenied):
                    await connect_ssh(sock, asyncssh.generate_private_key("ssh-ed25519"))
            # Rank 1 has its own daemon: log in there, no forward needed.
            async with ws_socket(url1, token) as sock, connect_ssh(sock, private) as conn:
                assert conn.get_extra_info("username") == JOB_SSH_USER
            # Rank 0: a local forward to the node's HTTP server.
            async with ws_socket(url, token) as sock, connect_ssh(sock, private) as conn:
                # forwards reach the node's own addresses only
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection("127.0.99.99", HTTP_PORT)
                return await http_get_through(conn, master, HTTP_PORT)

        data = asyncio.run(asyncio.wait_for(scenario(), 90))
        assert b" 200 " in data.split(b"\r\n", 1)[0] and b"hello-job-ssh" in data
    finally:
        cancel(ml, job.name)
    # Once the job ended: no instances, daemons closed, the endpoint is gone.
    assert services_of(ml, job.name, 0) is None and services_of(ml, job.name, 1) is None
    assert svc_emu.job_service_daemons(job.name) == []
    for daemon in daemons:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((daemon["ip"], daemon["port"])) != 0
    assert asyncio.run(ws_status(url, token)) == 404


def test_ssh_service_on_rank_0_only_without_nodes_all(svc_emu, svc_ml, job_key):
    job = submit(
        svc_ml,
        "echo up; sleep 60",
        nodes=2,
        distribution={"type": "mpi", "process_count_per_instance": 1},
        services=ssh_service(job_key[1]),
    )
    try:
        instance = wait_for(
            lambda: (s := services_of(svc_ml, job.name, 0)) and s["ssh"].status == "Running" and s,
            30,
            "rank 0's SSH service Running",
        )["ssh"]
        assert services_of(svc_ml, job.name, 1) is None
        assert [d["rank"] for d in svc_emu.job_service_daemons(job.name)] == [0]
        url = instance.properties["ProxyEndpoint"] + PROXY_PATH

        async def connection_ends_with_the_job() -> None:
            async with (
                ws_socket(url, emulator_token(svc_emu)) as sock,
                connect_ssh(sock, job_key[0]) as conn,
            ):
                await asyncio.to_thread(cancel, svc_ml, job.name)
                await asyncio.wait_for(conn.wait_closed(), 15)

        asyncio.run(asyncio.wait_for(connection_ends_with_the_job(), 60))
    finally:
        cancel(svc_ml, job.name)


def test_proxy_endpoint_is_wss_over_https(job_key):
    import ssl

    config = EmulatorConfig(
        computes=[ComputeSpec(name="svc", max_nodes=1)],
        environments=[EnvironmentSpec(name="dask-env", version="1")],
        build_environments=False,
        https=True,
        job_service_delay=0.0,
    )
    with Emulator(config=config) as emu:
        ml = emu.ml_client()
        job = submit(ml, "echo up; sleep 60", services=ssh_service(job_key[1]))
        instance = wait_for(
            lambda: (s := services_of(ml, job.name, 0)) and s["ssh"].status == "Running" and s,
            30,
            "the SSH service Running",
        )["ssh"]
        endpoint = instance.properties["ProxyEndpoint"]
        assert endpoint.startswith(emu.base_url.replace("https://", "wss://") + "/jobservice/")
        context = ssl.create_default_context(cafile=emu.cert_path)

        async def login() -> str:
            async with (
                ws_socket(endpoint + PROXY_PATH, emulator_token(emu), context) as sock,
                connect_ssh(sock, job_key[0]) as conn,
            ):
                return conn.get_extra_info("username")

        assert asyncio.run(asyncio.wait_for(login(), 60)) == JOB_SSH_USER
        cancel(ml, job.name)


def test_ssh_service_needs_keys_and_a_supported_job(svc_emu, svc_ml, job_key):
    # AML: not on multi-node jobs without a PyTorch, TensorFlow or MPI distribution
    with pytest.raises(HttpResponseError) as err:
        submit(svc_ml, "echo x", nodes=2, services=ssh_service(job_key[1]))
    assert err.value.status_code == 400
    assert "not supported on a 2-node job with distribution not set" in str(err.value)
    with pytest.raises(HttpResponseError) as err:
        submit(svc_ml, "echo x", distribution={"type": "pytorch"}, services=ssh_service(None))
    assert err.value.status_code == 400 and "sshPublicKeys" in str(err.value)
    with pytest.raises(HttpResponseError) as err:
        submit(
            svc_ml, "echo x", distribution={"type": "pytorch"}, services=ssh_service("not a key")
        )
    assert err.value.status_code == 400 and "not an OpenSSH public key" in str(err.value)
    # a TensorFlow job is accepted; so is a single-node job without distribution
    # (the documented example), whose service then runs
    tf = submit(
        svc_ml,
        "echo x",
        nodes=2,
        distribution={"type": "tensorflow", "worker_count": 2},
        services=ssh_service(job_key[1]),
    )
    cancel(svc_ml, tf.name)
    job = submit(svc_ml, "echo up; sleep 60", services=ssh_service(job_key[1]))
    try:
        wait_for(
            lambda: (s := services_of(svc_ml, job.name, 0)) and s["ssh"].status == "Running",
            30,
            "the single node's SSH service Running",
        )
    finally:
        cancel(svc_ml, job.name)


def test_other_service_types_are_accepted_and_not_run(svc_emu, svc_ml):
    from azure.ai.ml.entities import JupyterLabJobService, TensorBoardJobService

    job = submit(
        svc_ml,
        "echo hi",
        services={"lab": JupyterLabJobService(), "tb": TensorBoardJobService(log_dir="logs")},
    )
    assert svc_emu.wait_job(job.name, 30) == "Completed"
    assert set(svc_ml.jobs.get(job.name).services) >= {"lab", "tb"}
    assert services_of(svc_ml, job.name, 0) is None


def _node_ssh(emu: Any, ml: Any, compute: str) -> tuple[str, int, str, str]:
    """Run a job on ``compute``; return its node's nodeId, public port and host key; cancel it."""
    job = submit(ml, "echo up; sleep 60", compute=compute)
    try:
        wait_log(emu, job.name, 0, "up")
        node = emu.job_nodes(job.name)[0]
        listed = next(
            n for n in ml.compute.list_nodes(compute) if n.__dict__.get("runId") == job.name
        )
        assert listed.__dict__["port"] == node["ssh_port"]
        return job.name, node["ssh_port"], emu.host_key_for(job.name, 0), listed.__dict__["nodeId"]
    finally:
        cancel(ml, job.name)


def test_public_ssh_port_per_slot_and_host_key_per_vm(svc_emu, svc_ml):
    emu, ml = svc_emu, svc_ml
    # A slot kept allocated between jobs: same VM, same port, same host key.
    _, port_a, key_a, node_a = _node_ssh(emu, ml, "svc")
    _, port_b, key_b, node_b = _node_ssh(emu, ml, "svc")
    assert (port_b, key_b, node_b) == (port_a, key_a, node_a)
    # A preempted VM is gone: the next one behind the slot's port has a new key.
    job = submit(ml, "echo up; sleep 60", compute="svc")
    wait_log(emu, job.name, 0, "up")
    emu.preempt_node(job.name, 0)
    assert emu.wait_job(job.name, 30) == "Failed"
    _, port_c, key_c, node_c = _node_ssh(emu, ml, "svc")
    assert port_c == port_a and key_c != key_a and node_c != node_a
    # A slot released after the idle time: a new VM, same port, new key and nodeId.
    _, port_d, key_d, node_d = _node_ssh(emu, ml, "brief")
    wait_for(lambda: not list(ml.compute.list_nodes("brief")), 20, "brief scaled down to 0")
    _, port_e, key_e, node_e = _node_ssh(emu, ml, "brief")
    assert port_e == port_d and key_e != key_d and node_e != node_d


def test_emulator_sockets_send_small_writes_at_once():
    """TCP_NODELAY on both ends of the emulator's connections (the proxy's to a daemon, the
    daemons' forwards): without it two small writes met the peer's delayed ACK (~40 ms)."""
    from aml_emulator.network import LoopbackNetwork

    async def nodelay() -> tuple[int, int]:
        network = LoopbackNetwork()
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(option(writer))
            writer.close()

        def option(writer: asyncio.StreamWriter) -> int:
            sock = writer.get_extra_info("socket")
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

        listener = await network.listen(None, "127.0.0.1", 0)
        server = await asyncio.start_server(serve, sock=listener)
        async with server:
            port = listener.getsockname()[1]
            sock = await network.connect(None, "127.0.0.1", port, 5)
            _, writer = await asyncio.open_connection(sock=sock)
            dialled = option(writer)
            writer.close()
            return dialled, await asyncio.wait_for(accepted, 5)

    assert asyncio.run(nodelay()) == (1, 1)
