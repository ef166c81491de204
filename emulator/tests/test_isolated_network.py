"""The ``isolated`` network mode: a network namespace per compute, SSH as the only way in.

These tests need Linux network namespaces (root or CAP_SYS_ADMIN, util-linux
``unshare``/``nsenter``) and are skipped, saying why, where there are none.
Every address dialled is on loopback: the test process's own, or inside the
namespaces the emulator under test created.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from _emu_helpers import submit, wait_for, wait_log

from aml_emulator import (
    ComputeSpec,
    DatastoreSpec,
    EmulatorConfig,
    EnvironmentSpec,
    load_config,
)
from aml_emulator.cli import build_parser
from aml_emulator.emulator import Emulator
from aml_emulator.netns import IsolatedNetwork, NetworkNamespaceError

#: A node program (``python -c "$NODE_SCRIPT"``): rank 0 answers ``pong`` on
#: MASTER_ADDR:PROBE_PORT; the other ranks dial it (bounded) and print what they got.
NODE_SCRIPT = r"""
import os, socket, sys, time
host, port = os.environ["MASTER_ADDR"], int(os.environ["PROBE_PORT"])
if os.environ["RANK"] == "0":
    srv = socket.create_server((host, port))
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.sendall(b"pong")
        conn.close()
deadline = time.monotonic() + 30
while True:
    try:
        with socket.create_connection((host, port), timeout=2) as c:
            print("peer-got", c.recv(10).decode(), flush=True)
            sys.exit(0)
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
"""

#: A node program: exit 0 only if dialling TARGET_HOST:TARGET_PORT is refused.
MUST_BE_REFUSED = r"""
import os, socket, sys
try:
    socket.create_connection((os.environ["TARGET_HOST"], int(os.environ["TARGET_PORT"])), 5)
except OSError as exc:
    print("refused:", exc, flush=True)
    sys.exit(0)
print("connected", flush=True)
sys.exit(1)
"""

#: A node program: GET BLOB_URL; exit 0 only on HTTP 200 with the fake endpoint's body.
GET_BLOB_ENDPOINT = r"""
import os, sys, urllib.request
with urllib.request.urlopen(os.environ["BLOB_URL"], timeout=10) as resp:
    body = resp.read()
print("blob-status", resp.status, body, flush=True)
sys.exit(0 if resp.status == 200 and body == b"blob-endpoint-ok" else 1)
"""

#: A node program: GET the run from the tracking URI; exit 0 only on HTTP 200.
GET_TRACKING_URI = r"""
import os, sys, urllib.request
# what azureml-mlflow calls for the azureml:// URI: https, /mlflow/v2.0, the run's token
base = "https://" + os.environ["MLFLOW_TRACKING_URI"].split("://", 1)[1].replace("/v1.0/", "/v2.0/")
url = base + "/api/2.0/mlflow/runs/get?run_id=" + os.environ["MLFLOW_RUN_ID"]
auth = {"Authorization": "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]}
with urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=10) as resp:
    body = resp.read()
print("tracking-status", resp.status, body[:60], flush=True)
sys.exit(0 if resp.status == 200 and os.environ["MLFLOW_RUN_ID"].encode() in body else 1)
"""

PYTORCH = {"type": "pytorch"}


def _require_namespaces() -> None:
    """Isolated mode must run wherever the suite runs (CI is root): a machine without it fails."""
    try:
        asyncio.run(asyncio.wait_for(IsolatedNetwork().check(), 30))
    except NetworkNamespaceError as exc:
        pytest.fail(f"no network namespaces on this machine (the isolated tests need them): {exc}")


def _refused(host: str, port: int) -> bool:
    """Whether dialling ``host:port`` from the test process gets no connection."""
    with socket.socket() as s:
        s.settimeout(3)
        try:
            s.connect((host, port))
        except OSError:
            return True
    return False


def _netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _script_job(ml: Any, script: str, **kwargs: Any) -> Any:
    env = {"NODE_SCRIPT": script, **kwargs.pop("env", {})}
    return submit(ml, 'python -c "$NODE_SCRIPT"', env=env, **kwargs)


class _FakeBlobHandler(http.server.BaseHTTPRequestHandler):
    """Stands in for a datastore's blob endpoint (Azurite) on the test's loopback."""

    def do_GET(self) -> None:
        body = b"blob-endpoint-ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def blob_endpoint() -> Iterator[str]:
    """URL of a fake blob endpoint served by the test process on 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeBlobHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/devstoreaccount1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def iso(ssh_keypair: tuple[str, str], blob_endpoint: str) -> Iterator[Emulator]:
    """An emulator in isolated mode: ``cpu-cluster`` (3 nodes, SSH) and ``other`` (1 node).

    Its datastore ``blobs`` points at ``blob_endpoint``.
    """
    _require_namespaces()
    computes = [
        ComputeSpec("cpu-cluster", max_nodes=3, ssh_public_keys=[ssh_keypair[1]]),
        ComputeSpec("other", max_nodes=1, ssh_public_access=False),
    ]
    store = DatastoreSpec(
        name="blobs",
        account="devstoreaccount1",
        container="data",
        credential="none",
        endpoint=blob_endpoint,
    )
    with Emulator(
        computes=computes,
        environments=[EnvironmentSpec(name="dask-env", version="1")],
        datastores=[store],
        network="isolated",
        build_environments=False,
    ) as emu:
        yield emu


@pytest.fixture(scope="module")
def iso_ml(iso: Emulator) -> Any:
    return iso.ml_client()


def test_network_mode_is_validated_and_loadable(tmp_path):
    assert EmulatorConfig().network == "loopback"
    with pytest.raises(ValueError, match="network must be one of"):
        EmulatorConfig(network="vnet")
    path = tmp_path / "emu.yaml"
    path.write_text("network: isolated\ncomputes: [{name: c}]\n")
    assert load_config(path).network == "isolated"
    assert Emulator.from_file(str(path)).config.network == "isolated"
    assert build_parser().parse_args(["--network", "isolated"]).network == "isolated"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--network", "vnet"])


def test_start_fails_naming_why_without_the_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare / nsenter to be found
    emu = Emulator(network="isolated", build_environments=False, workdir=str(tmp_path))
    with pytest.raises(NetworkNamespaceError, match=r"unshare and nsenter .*not found on PATH"):
        emu.start()
    assert not emu.running and emu.node_network is None


def test_start_fails_naming_why_without_cap_sys_admin(tmp_path):
    import shutil
    import subprocess
    import sys

    _require_namespaces()
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux, beside unshare/nsenter) drops CAP_SYS_ADMIN"
    script = (
        "from aml_emulator import Emulator\n"
        "try:\n"
        f"    Emulator(network='isolated', build_environments=False, workdir={str(tmp_path)!r})"
        ".start()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    # the same user without CAP_SYS_ADMIN (dropped from the bounding set for the child)
    out = subprocess.run(
        [setpriv, "--bounding-set=-sys_admin", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert out.startswith("NetworkNamespaceError"), out
    assert "unshare --net" in out and "Operation not permitted" in out and "CAP_SYS_ADMIN" in out


def test_cli_runs_isolated_and_reports_why_it_cannot(tmp_path, capsys, monkeypatch):
    from aml_emulator import run_emulator_cli

    _require_namespaces()
    ready, stop = threading.Event(), threading.Event()
    result: list[int] = []
    argv = ["--network", "isolated", "--no-build"]
    thread = threading.Thread(
        target=lambda: result.append(run_emulator_cli(argv, ready=ready, stop=stop))
    )
    thread.start()
    try:
        assert ready.wait(30)
        assert "network:  isolated" in capsys.readouterr().out
    finally:
        stop.set()
        thread.join(30)
    assert result == [0]
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_emulator_cli(argv) == 2
    assert "not found on PATH" in capsys.readouterr().err


def test_node_port_reachable_from_its_peers_only(iso, iso_ml):
    job = _script_job(
        iso_ml, NODE_SCRIPT, nodes=2, distribution=PYTORCH, env={"PROBE_PORT": "8701"}
    )
    try:
        wait_log(iso, job.name, 0, "listening")
        nodes = iso.job_nodes(job.name)
        ip = nodes[0]["ip"]
        # the test process (the client's network) gets no connection ...
        assert _refused(ip, 8701)
        # ... while a node of the same compute does
        wait_log(iso, job.name, 1, "peer-got pong")
        # a node of another compute is in another namespace: refused too
        probe = _script_job(
            iso_ml,
            MUST_BE_REFUSED,
            compute="other",
            env={"TARGET_HOST": ip, "TARGET_PORT": "8701"},
        )
        assert iso.wait_job(probe.name, 30) == "Completed", iso.node_log(probe.name, 0)
        # the nodes run in the compute's namespace, in the process group the emulator made
        network = iso.node_network
        assert isinstance(network, IsolatedNetwork)
        holder = network.holder_pids["cpu-cluster"]
        pid = nodes[0]["pid"]
        assert _netns(pid) == _netns(holder) != _netns(os.getpid())
        assert os.getpgid(pid) == pid
        assert set(network.holder_pids) == {"cpu-cluster", "other"}
    finally:
        iso_ml.jobs.begin_cancel(job.name).result(timeout=30)


def test_nodes_reach_the_emulator_only_through_its_bridges(iso, iso_ml, blob_endpoint):
    base = urlsplit(iso.base_url)
    blob = urlsplit(blob_endpoint)
    tracking = urlsplit(iso.node_tracking_uri)  # the nodes' azureml:// tracking endpoint
    assert iso.node_endpoints() == [
        (base.hostname, base.port),
        (tracking.hostname, tracking.port),
        (blob.hostname, blob.port),
    ]
    ok = _script_job(iso_ml, GET_TRACKING_URI)
    assert iso.wait_job(ok.name, 30) == "Completed", iso.node_log(ok.name, 0)
    assert "tracking-status 200" in iso.node_log(ok.name, 0)
    # the datastore's blob endpoint (Azurite's place) is bridged as well
    store = _script_job(iso_ml, GET_BLOB_ENDPOINT, env={"BLOB_URL": blob_endpoint + "/data"})
    assert iso.wait_job(store.name, 30) == "Completed", iso.node_log(store.name, 0)
    # A port of the test process on the emulator's own host address, not bridged: refused.
    with socket.create_server(("127.0.0.1", 0)) as outside:
        outside.setblocking(False)
        port = outside.getsockname()[1]
        blocked = _script_job(
            iso_ml, MUST_BE_REFUSED, env={"TARGET_HOST": "127.0.0.1", "TARGET_PORT": str(port)}
        )
        assert iso.wait_job(blocked.name, 30) == "Completed", iso.node_log(blocked.name, 0)
        with pytest.raises(BlockingIOError):
            outside.accept()  # nothing ever arrived


def test_public_ssh_endpoint_forwards_into_the_namespace(iso, iso_ml, ssh_keypair):
    import asyncssh

    job = _script_job(iso_ml, NODE_SCRIPT, distribution=PYTORCH, env={"PROBE_PORT": "8702"})
    try:
        wait_log(iso, job.name, 0, "listening")
        node = wait_for(lambda: iso.job_nodes(job.name)[0], 10, "node record")
        ip, ssh_port = node["ip"], node["ssh_port"]
        assert ssh_port and _refused(ip, 8702)
        known_hosts = f"[127.0.0.1]:{ssh_port} {iso.host_key_for(job.name, 0)}\n"

        async def through_ssh() -> bytes:
            async with asyncssh.connect(
                "127.0.0.1",
                ssh_port,
                username="azureuser",
                client_keys=[asyncssh.import_private_key(ssh_keypair[0])],
                known_hosts=asyncssh.import_known_hosts(known_hosts),
                agent_path=None,
                config=[],
            ) as conn:
                reader, writer = await conn.open_connection(ip, 8702)
                data = await reader.read(10)
                writer.close()
                return data

        assert asyncio.run(asyncio.wait_for(through_ssh(), 30)) == b"pong"
    finally:
        iso_ml.jobs.begin_cancel(job.name).result(timeout=30)


def test_stop_leaves_no_holder_and_no_node(tmp_path):
    _require_namespaces()
    emu = Emulator(
        computes=[ComputeSpec("cpu-cluster", max_nodes=2)],
        network="isolated",
        build_environments=False,
        workdir=str(tmp_path),
    )
    emu.start()
    try:
        network = emu.node_network
        assert isinstance(network, IsolatedNetwork)
        assert network.holder_pids == {}  # namespaces are made on first use
        ml = emu.ml_client()
        job = submit(ml, "echo up; sleep 600", nodes=2, environment="azureml:AzureML-x@latest")
        wait_log(emu, job.name, 1, "up")
        holders = list(network.holder_pids.values())
        nodes = [n["pid"] for n in emu.job_nodes(job.name)]
        assert len(holders) == 1 and all(_alive(p) for p in holders + nodes)
    finally:
        emu.stop()
    assert emu.node_network is None
    wait_for(lambda: not any(_alive(p) for p in holders + nodes), 10, "holder and nodes gone")
    assert os.listdir(tmp_path) == []


#: A child emulator in isolated mode: start a 1-node job, print the holder's and node's
#: PIDs as JSON, then wait to be killed.
CHILD_EMULATOR = r"""
import json, sys, time
from azure.ai.ml import command
from aml_emulator import ComputeSpec, Emulator
emu = Emulator(computes=[ComputeSpec("c", max_nodes=1)], network="isolated",
               build_environments=False, workdir=sys.argv[1]).start()
ml = emu.ml_client()
job = ml.jobs.create_or_update(command(command="echo up; sleep 600", compute="c",
    environment="azureml:AzureML-x@latest", experiment_name="kill-test"))
deadline = time.monotonic() + 30
while "up" not in emu.node_log(job.name, 0) and time.monotonic() < deadline:
    time.sleep(0.05)
pids = {"holders": list(emu.node_network.holder_pids.values()),
        "nodes": [n["pid"] for n in emu.job_nodes(job.name)]}
print(json.dumps(pids), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_emulator_leaves_no_holder_behind(tmp_path):
    import json
    import select
    import signal
    import subprocess
    import sys

    _require_namespaces()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_EMULATOR, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)  # bounded: no blocking read
        assert ready, "the child emulator printed no PIDs within 60 s"
        pids = json.loads(child.stdout.readline())
        assert len(pids["holders"]) == 1 and all(_alive(p) for p in pids["nodes"])
    finally:
        child.send_signal(signal.SIGKILL)  # the PID this test started; no cleanup runs
        child.wait(30)
    # the holder sees its stdin pipe close; the reaper kills the node groups
    every = pids["holders"] + pids["nodes"]
    wait_for(lambda: not any(_alive(p) for p in every), 20, "holder and nodes gone")
