"""Reaching the scheduler through the node's SSH endpoint (real asyncssh, real Dask)."""

from __future__ import annotations

import time
import urllib.request

import pytest
from _helpers import FAST_CLUSTER
from distributed import Client

from aml_emulator import ComputeSpec, Emulator
from dask_amlcompute import AmlComputeCluster
from dask_amlcompute.exceptions import HostKeyError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ssh_emulator(ssh_key):
    _, public = ssh_key
    computes = [
        ComputeSpec(
            name="ssh-cluster", max_nodes=4, admin_user="azureuser", ssh_public_keys=[public]
        ),
    ]
    with Emulator(computes=computes) as emu:
        yield emu


def kwargs(ssh_key, tmp_path, **extra):
    out = {
        "compute": "ssh-cluster",
        "n_nodes": 2,
        **FAST_CLUSTER,
        "connect": "ssh",
        "ssh_key": str(ssh_key[0]),
        "known_hosts": str(tmp_path / "known_hosts"),
    }
    out.update(extra)
    return out


def test_unknown_host_key_is_refused_and_the_job_cancelled(ssh_emulator, ssh_key, tmp_path):
    with pytest.raises(HostKeyError, match="trust_on_first_use"):
        AmlComputeCluster(
            ssh_emulator.ml_client(), name="unknown-host-key", **kwargs(ssh_key, tmp_path)
        )
    assert ssh_emulator.wait_job("unknown-host-key-main", timeout=30) in (
        "Canceled",
        "Completed",
        "Failed",
    )
    assert "unknown-host-key-main" not in ssh_emulator.active_jobs()


def test_auto_uses_direct_when_the_scheduler_is_reachable(ssh_emulator, ssh_key, tmp_path):
    with AmlComputeCluster(
        ssh_emulator.ml_client(), **kwargs(ssh_key, tmp_path, connect="auto", n_nodes=1)
    ) as cluster:
        assert cluster._connector.mode == "direct"
        assert not cluster.scheduler_address.startswith("tcp://127.0.0.1:")


def test_cluster_through_ssh_tunnel_survives_a_dropped_connection_and_moves_bulk_data(
    ssh_emulator, ssh_key, tmp_path
):
    import numpy as np
    import psutil

    known_hosts = tmp_path / "known_hosts"
    with (
        AmlComputeCluster(
            ssh_emulator.ml_client(), **kwargs(ssh_key, tmp_path, ssh_trust_on_first_use=True)
        ) as cluster,
        Client(cluster) as client,
    ):
        job = cluster.main_job_name
        # the client talks to a local forwarded port, not the node's private address
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert client.submit(lambda x: x + 1, 41).result() == 42
        data = client.scatter(list(range(100)))
        assert sum(client.gather(data)) == 4950
        assert sum(client.gather(client.map(lambda x: x * 2, range(50)))) == 2450
        # the dashboard is forwarded too and its link points at the local end
        link = cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        health = urllib.request.urlopen(link.replace("/status", "/health"), timeout=10).read()
        assert health == b"ok"
        # trust-on-first-use recorded the node's real host key
        assert ssh_emulator.host_key_for(job, 0).split()[1] in known_hosts.read_text()

        tunnel = cluster._connector.tunnel
        local_ports = {tunnel.local_address(name)[1] for name in ("scheduler", "dashboard")}
        array = np.arange(
            50 * 2**20 // 8, dtype="float64"
        )  # 50 MB through the scheduler and tunnel
        [future] = client.scatter([array])
        assert client.submit(lambda a: float(a.sum()), future).result() == float(array.sum())
        assert np.array_equal(client.gather(future), array)

        cluster.loop.add_callback(tunnel._conn.abort)  # the SSH connection drops
        deadline = time.monotonic() + 30
        while tunnel.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tunnel.reconnects >= 1
        assert client.submit(lambda x: x * 3, 7).result(timeout=60) == 21
    listening = {
        c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
    }
    assert not local_ports & listening  # close left no forwarded port open
    assert ssh_emulator.wait_job(job, timeout=30) in ("Completed", "Canceled")
