"""The job SSH path through a corporate HTTP proxy (``HTTPS_PROXY``, ``CONNECT``).

A real proxy (the ``proxy.py`` package, in its own process on loopback) sits
between the client and the emulator's job-service WebSocket proxy, served over
HTTPS as AML's is (``wss://``). :func:`open_proxy_tunnel` must tunnel through it
when ``HTTPS_PROXY`` names it, the proxy's own access log showing the
``CONNECT``; ``NO_PROXY`` bypasses it; a proxy that is down is a typed error.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import asyncssh
import pytest
from _helpers import clear_proxy_env, http_proxy, wait_for

from aml_emulator import ComputeSpec, Emulator, EnvironmentSpec
from aml_emulator.config import EmulatorConfig
from aml_emulator.ssh import generate_client_keypair
from dask_amlcompute.connect.jobservice import JOB_SSH_USER
from dask_amlcompute.connect.proxy import TOKEN_SCOPE, open_proxy_tunnel, proxy_url
from dask_amlcompute.exceptions import TunnelUnreachableError

pytestmark = pytest.mark.slow


def login(url: str, token: str, key: str) -> str:
    """Log in to the job's SSH daemon over :func:`open_proxy_tunnel`; return the user name."""

    async def run() -> str:
        tunnel = await open_proxy_tunnel(url, token, timeout=10)
        async with asyncssh.connect(
            "jobservice",
            tunnel=tunnel,
            username=JOB_SSH_USER,
            client_keys=[asyncssh.import_private_key(key)],
            known_hosts=None,
            agent_path=None,
            config=[],
        ) as conn:
            return conn.get_extra_info("username")

    return asyncio.run(asyncio.wait_for(run(), 60))


def test_job_ssh_goes_through_https_proxy_and_honours_no_proxy(tmp_path, monkeypatch):
    from azure.ai.ml import command
    from azure.ai.ml.entities import SshJobService

    private, public = generate_client_keypair("proxy-tests")
    config = EmulatorConfig(
        computes=[ComputeSpec(name="svc", max_nodes=1)],
        environments=[EnvironmentSpec(name="dask-env", version="1")],
        build_environments=False,
        https=True,
        job_service_delay=0.0,
    )
    with Emulator(config=config) as emu, http_proxy(tmp_path) as (proxy, log):
        ml = emu.ml_client()
        job = ml.jobs.create_or_update(
            command(
                command="echo up; sleep 60",
                compute="svc",
                environment="azureml:dask-env:1",
                services={"ssh": SshJobService(ssh_public_keys=public)},
            )
        )

        def running() -> object:
            found = ml.jobs.show_services(job.name, 0)
            return found and found["ssh"].status == "Running" and found["ssh"]

        endpoint = wait_for(running, 30, "the SSH service").properties["ProxyEndpoint"]
        assert endpoint.startswith("wss://")
        # https:// names the same WebSocket (azure-dev's client rewrites it too)
        url = proxy_url(endpoint.replace("wss://", "https://", 1))
        assert url == proxy_url(endpoint)
        netloc = urlparse(url).netloc
        token = emu.credential().get_token(TOKEN_SCOPE).token
        with monkeypatch.context() as env:
            clear_proxy_env(env)
            env.setenv("REQUESTS_CA_BUNDLE", emu.cert_path)
            env.setenv("HTTPS_PROXY", proxy)
            assert login(url, token, private) == JOB_SSH_USER
            # proxy.py logs each tunnelled connection when it closes
            wait_for(lambda: f"CONNECT {netloc}" in log.read_text(), 15, "the proxy's CONNECT")
            env.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # discard port: nobody listens
            with pytest.raises(TunnelUnreachableError):
                login(url, token, private)
            env.setenv("NO_PROXY", "127.0.0.1")
            assert login(url, token, private) == JOB_SSH_USER
        ml.jobs.begin_cancel(job.name).result(timeout=30)


def test_proxy_endpoint_schemes():
    assert proxy_url("https://ssh-<nodeIndex>.x/", 1) == "wss://ssh-1.x/nbip/v1.0/ws-tcp"
    assert proxy_url("HTTP://h:8080") == "ws://h:8080/nbip/v1.0/ws-tcp"
    assert proxy_url("wss://h") == "wss://h/nbip/v1.0/ws-tcp"
    with pytest.raises(TunnelUnreachableError, match="ftp://h"):  # typed, not a KeyError
        asyncio.run(open_proxy_tunnel(proxy_url("ftp://h"), "token", timeout=5))


def test_close_sends_what_was_written_in_frames_of_at_most_16_kib(monkeypatch):
    """``close`` flushes (asyncssh's DISCONNECT must reach the daemon); ``abort`` drops."""
    from websockets.asyncio.server import serve

    clear_proxy_env(monkeypatch)
    payload = bytes(range(256)) * 65537  # 16 MiB and a bit: more than the sockets buffer

    async def send(how: str) -> list[bytes]:
        got: list[bytes] = []
        ended = asyncio.Event()

        async def handler(ws) -> None:
            await asyncio.sleep(0.5)  # the client's writes back up meanwhile
            got.extend([m async for m in ws])
            ended.set()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            tunnel = await open_proxy_tunnel(f"ws://127.0.0.1:{port}/x", "token", timeout=10)
            lost = asyncio.Event()

            class Ssh(asyncio.Protocol):
                def connection_lost(self, exc: Exception | None) -> None:
                    lost.set()

            await tunnel.create_connection(Ssh, "daemon", 22)
            await asyncio.sleep(0)
            tunnel.write(payload)
            getattr(tunnel, how)()
            assert tunnel.is_closing()
            tunnel.write(b"too late")  # refused once closing, as a transport does
            await asyncio.wait_for(asyncio.gather(lost.wait(), ended.wait()), 20)
        return got

    got = asyncio.run(send("close"))
    assert b"".join(got) == payload and max(map(len, got)) == 16 * 1024
    assert len(b"".join(asyncio.run(send("abort")))) < len(payload)  # what was buffered is dropped
