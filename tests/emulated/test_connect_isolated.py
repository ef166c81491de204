"""A stock workspace: nodes the client cannot reach, no public SSH (isolated emulator network).

The emulator puts each compute's nodes in a network namespace of their own
(``network="isolated"``): nothing here monkeypatches the probe; the client
really cannot dial the scheduler's private address.
"""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from _helpers import FAST_CLUSTER
from distributed import Client

from aml_emulator import ComputeSpec, Emulator
from dask_amlcompute import AmlComputeCluster, ConfigurationError
from dask_amlcompute._protocol import REFUSED, UNANSWERED, probe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def isolated(ssh_key):
    computes = [
        # a stock compute: no SSH public access, no admin user
        ComputeSpec(name="stock", max_nodes=4, admin_user=None, ssh_public_access=False),
        # public SSH, nodes released at once (a new VM, with a new host key, each allocation)
        ComputeSpec(
            name="public-ssh",
            max_nodes=1,
            ssh_public_keys=[ssh_key[1]],
            idle_seconds_before_scaledown=0,
        ),
    ]
    with Emulator(computes=computes, network="isolated", build_environments=False) as emu:
        yield emu


def test_auto_reaches_a_stock_workspace_through_the_job_ssh_service(isolated):
    with (
        AmlComputeCluster(isolated.ml_client(), compute="stock", n_nodes=2, **FAST_CLUSTER) as c,
        Client(c) as client,
    ):
        # the private address really is out of reach from here
        assert asyncio.run(probe(c._context.state.scheduler_address, 2)) in (REFUSED, UNANSWERED)
        assert c._connector.mode == "job-ssh"
        assert c.scheduler_address.startswith("tcp://127.0.0.1:")
        assert client.submit(lambda x: x * 2, 21).result() == 42
        assert sum(client.gather(client.map(lambda x: x + 1, range(20)))) == 210
        assert len(client.scheduler_info()["workers"]) == 2
        # the dashboard is forwarded on the same connection and its link opens
        link = c.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(link.replace("/status", "/health"), timeout=10).read() == (
            b"ok"
        )
        # the main job declares the SSH service with the cluster's (in-memory) key
        job = isolated.ml_client().jobs.get(c.main_job_name)
        assert job.services["dask_ssh"].ssh_public_keys.startswith("ssh-ed25519 ")
        assert job.services["dask_ssh"].nodes is None  # node 0 only, the scheduler's
        assert [d["rank"] for d in isolated.job_service_daemons(c.main_job_name)] == [0]


def test_public_ssh_on_a_stock_compute_is_refused_before_submitting(isolated, ssh_key):
    with pytest.raises(ConfigurationError, match="SSH public access") as raised:
        AmlComputeCluster(
            isolated.ml_client(),
            compute="stock",
            name="stock-public-ssh",
            connect="ssh",
            ssh_key=str(ssh_key[0]),
            **FAST_CLUSTER,
        )
    # the compute's settings say public SSH cannot work: refused before any node is paid for,
    # naming what works instead (the job's SSH service)
    assert "connect='auto'" in str(raised.value) and "Nothing was submitted" in str(raised.value)
    assert not any(j.name == "stock-public-ssh-main" for j in isolated.ml_client().jobs.list())


def test_a_reallocated_node_with_a_new_host_key_is_trusted_on_first_use(
    isolated, ssh_key, tmp_path
):
    known_hosts = tmp_path / "known_hosts"
    options = dict(
        compute="public-ssh",
        n_nodes=1,
        connect="ssh",
        ssh_key=str(ssh_key[0]),
        known_hosts=str(known_hosts),
        ssh_trust_on_first_use=True,
        **FAST_CLUSTER,
    )
    keys, endpoints = [], []
    for _ in range(2):
        with AmlComputeCluster(isolated.ml_client(), **options) as cluster, Client(cluster) as c:
            assert cluster._connector.mode == "ssh"
            assert c.submit(lambda: "ok").result() == "ok"
            [node] = isolated.job_nodes(cluster.main_job_name)
            keys.append(node["host_public_key"])
            endpoints.append(node["ssh_port"])
        isolated.wait_job(cluster.main_job_name, timeout=30)
    # the same load-balancer port, a new VM behind it: a new host key under a new node alias
    assert endpoints[0] == endpoints[1] and keys[0] != keys[1]
    lines = known_hosts.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("aml-public-ssh-") for line in lines)
    assert lines[0].split()[0] != lines[1].split()[0]


def test_reattaching_needs_the_key_and_says_so_when_no_path_works(isolated, ssh_key):
    from dask_amlcompute import SchedulerUnreachableError

    key = str(ssh_key[0])
    with AmlComputeCluster(
        isolated.ml_client(), compute="stock", n_nodes=1, ssh_key=key, **FAST_CLUSTER
    ) as owner:
        # the same key: the job's SSH service lets the second object in
        with (
            AmlComputeCluster.from_name(owner.name, isolated.ml_client(), ssh_key=key) as again,
            Client(again) as client,
        ):
            assert again._connector.mode == "job-ssh"
            assert client.submit(lambda: "again").result() == "again"
        assert isolated.job_status(owner.main_job_name) == "Running"  # detaching left it
        # without it no path can work here, and the error lists each one and what it needs
        with pytest.raises(SchedulerUnreachableError) as raised:
            AmlComputeCluster.from_name(owner.name, isolated.ml_client(), **FAST_CLUSTER)
        message = str(raised.value)
        assert "direct:" in message and "refused" in message
        assert "job-ssh: not available" in message and "ssh_key=" in message
        assert "ssh: not available" in message and "SSH public access" in message
        # the owner's cluster is untouched by the failed attach
        assert isolated.job_status(owner.main_job_name) == "Running"
