"""Start/stop hygiene (no leaked processes, ports, temp dirs) and SSH through a node."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import psutil
import pytest
from _emu_helpers import submit, wait_for, wait_log

from aml_emulator import ComputeSpec, Emulator


def _listening_ports() -> set[int]:
    me = psutil.Process()
    return {c.laddr.port for c in me.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


@pytest.mark.slow
def test_start_stop_20_times_leaves_nothing_behind(tmp_path):
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    ports_before = _listening_ports()
    threads_before = threading.active_count()
    spawned: list[int] = []
    for i in range(20):
        emu = Emulator(computes=[ComputeSpec("cpu-cluster", max_nodes=2)], workdir=str(tmp_path))
        emu.start()
        port = int(emu.base_url.rsplit(":", 1)[1])
        assert port in _listening_ports()
        tempdir = emu.tempdir
        assert tempdir and os.path.isdir(tempdir)
        if i % 5 == 0:
            # A running job whose node also has a background child: stop must kill both.
            ml = emu.ml_client()
            job = submit(
                ml,
                "sleep 60 & echo ready; wait",
                nodes=2,
                distribution={"type": "pytorch"},
                environment="azureml:AzureML-x@latest",
            )
            for rank in range(2):
                wait_log(emu, job.name, rank, "ready")
            for node in emu.job_nodes(job.name):
                spawned.append(node["pid"])
                spawned.extend(c.pid for c in psutil.Process(node["pid"]).children(recursive=True))
        emu.stop()
        emu.stop()  # idempotent
        assert not os.path.exists(tempdir)
        assert port not in _listening_ports()
        with socket.socket() as s:  # the port is really free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    assert spawned

    def _gone() -> bool:
        alive = [
            p
            for p in spawned
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        return not alive

    wait_for(_gone, 10, "node processes gone")
    assert {p.pid for p in me.children(recursive=True)} <= children_before
    assert _listening_ports() <= ports_before
    assert os.listdir(tmp_path) == []
    wait_for(lambda: threading.active_count() <= threads_before + 1, 10, "threads stopped")


def test_calls_after_stop_raise_cleanly():
    emu = Emulator()
    with pytest.raises(RuntimeError, match="not running"):
        emu.job_status("x")
    emu.start()
    emu.stop()
    with pytest.raises(RuntimeError, match="not running"):
        emu.active_jobs()


@pytest.mark.slow
def test_ssh_tunnel_to_rank0_with_host_key_verification(emu, ml, ssh_keypair):
    import asyncssh

    # rank 0 serves on its own address (MASTER_ADDR; AML gives no variable for the others)
    cmd = (
        'echo ready-to-serve; python -c "import http.server, os, time; '
        "os.environ['NODE_RANK'] == '0' or time.sleep(600); "
        "http.server.HTTPServer((os.environ['MASTER_ADDR'], 8799), "
        'http.server.SimpleHTTPRequestHandler).serve_forever()"'
    )
    job = submit(
        ml, f"echo hello-over-ssh > index.html; {cmd}", nodes=2, distribution={"type": "pytorch"}
    )
    try:
        wait_log(emu, job.name, 0, "ready-to-serve")
        nodes = [
            n
            for n in ml.compute.list_nodes("cpu-cluster")
            if (n.__dict__.get("runId") or getattr(n, "run_id", None)) == job.name
        ]
        rank0_ip = emu.job_nodes(job.name)[0]["ip"]
        rank0 = next(n for n in nodes if n.__dict__.get("privateIpAddress") == rank0_ip)
        host, port = rank0.__dict__["publicIpAddress"], rank0.__dict__["port"]
        host_key = emu.host_key_for(job.name, 0)
        assert host_key and host_key.startswith("ssh-ed25519 ")
        private_key = asyncssh.import_private_key(ssh_keypair[0])
        wrong_key = asyncssh.generate_private_key("ssh-ed25519")
        other_host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()

        def known_hosts(key: str) -> asyncssh.SSHKnownHosts:
            return asyncssh.import_known_hosts(f"[{host}]:{port} {key}\n")

        async def scenario() -> bytes:
            # Wrong client key: refused.
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncssh.connect(
                    host,
                    port,
                    username="azureuser",
                    client_keys=[wrong_key],
                    known_hosts=known_hosts(host_key),
                    agent_path=None,
                )
            # Wrong expected host key: the client refuses the server.
            with pytest.raises(asyncssh.HostKeyNotVerifiable):
                await asyncssh.connect(
                    host,
                    port,
                    username="azureuser",
                    client_keys=[private_key],
                    known_hosts=known_hosts(other_host_key),
                    agent_path=None,
                )
            async with asyncssh.connect(
                host,
                port,
                username="azureuser",
                client_keys=[private_key],
                known_hosts=known_hosts(host_key),
                agent_path=None,
            ) as conn:
                listener = await conn.forward_local_port("127.0.0.1", 0, rank0_ip, 8799)
                local_port = listener.get_port()
                for _ in range(100):
                    try:
                        reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
                        writer.write(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                        await writer.drain()
                        data = await asyncio.wait_for(reader.read(), 10)
                        writer.close()
                        if b"hello-over-ssh" in data:
                            listener.close()
                            return data
                    except (ConnectionError, asyncio.IncompleteReadError):
                        pass
                    await asyncio.sleep(0.1)
                listener.close()
                return b""

        data = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert b"200" in data.split(b"\r\n", 1)[0] and b"hello-over-ssh" in data
    finally:
        ml.jobs.begin_cancel(job.name).result(timeout=30)
    # The SSH endpoints are closed when the nodes are released.
    ports = [n["ssh_port"] for n in emu.job_nodes(job.name)]
    for p in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0


def test_no_ssh_endpoint_without_public_access(emu, ml):
    job = submit(ml, "echo ready; sleep 30", compute="small")
    try:
        wait_log(emu, job.name, 0, "ready")
        node = emu.job_nodes(job.name)[0]
        assert node["ssh_port"] is None and emu.host_key_for(job.name, 0) is None
        listed = [n for n in ml.compute.list_nodes("small") if n.__dict__.get("runId") == job.name]
        assert listed and listed[0].__dict__.get("port") is None
    finally:
        ml.jobs.begin_cancel(job.name).result(timeout=30)


def test_concurrent_emulators_use_distinct_node_addresses(emu):
    with Emulator(computes=[ComputeSpec("cpu-cluster", max_nodes=1)]) as other:
        assert other.node_net != emu.node_net
        ml = other.ml_client()
        job = submit(ml, "echo hi", environment="azureml:AzureML-x@latest")
        assert other.wait_job(job.name, 20) == "Completed"
        ip = other.job_nodes(job.name)[0]["ip"]
        assert ip == f"127.{other.node_net}.1.1"
    # The claim is released on stop.
    from aml_emulator.netclaim import CLAIM_PORT

    with socket.socket() as s:
        s.bind((f"127.{other.node_net}.0.1", CLAIM_PORT))
