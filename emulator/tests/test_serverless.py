"""Serverless command jobs (no ``compute``; ``resources.instance_type``, ``queue_settings``).

Through the real SDK: the job runs on ``instance_count`` nodes of its size, counts
against the quota of its tier, Spot jobs can be preempted, and what AML would refuse
is refused at submit.  The last test runs two serverless jobs in the ``isolated``
network mode: each gets a network namespace of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from _emu_helpers import PRINT_ENV, node_env, wait_for, wait_log

from aml_emulator import (
    ComputeSpec,
    Emulator,
    EmulatorConfig,
    EnvironmentSpec,
    QuotaSpec,
)

PYTORCH = {"type": "pytorch"}
ENV = "azureml:dask-env:1"


@pytest.fixture(scope="module")
def sls() -> Iterator[Emulator]:
    """An emulator whose only compute is a small cluster; E8s_v3 quota for 3 nodes."""
    config = EmulatorConfig(
        computes=[ComputeSpec("cpu-cluster", max_nodes=1, ssh_public_access=False)],
        environments=[EnvironmentSpec(name="dask-env", version="1")],
        quota=QuotaSpec(low_priority_vcpus=24, families={"standardESv3Family": 24}),
        build_environments=False,
    )
    with Emulator(config=config) as emu:
        yield emu


@pytest.fixture(scope="module")
def sml(sls: Emulator) -> Any:
    return sls.ml_client()


def serverless(
    ml: Any,
    cmd: str,
    *,
    instance_type: str | None = "Standard_E8s_v3",
    count: int = 1,
    tier: str | None = None,
    **kwargs: Any,
) -> Any:
    """Submit a command job without compute, as Microsoft Learn's serverless examples do."""
    from azure.ai.ml import command
    from azure.ai.ml.entities import JobResourceConfiguration, QueueSettings

    job = command(
        command=cmd,
        environment=ENV,
        resources=JobResourceConfiguration(instance_type=instance_type, instance_count=count),
        queue_settings=QueueSettings(job_tier=tier) if tier else None,
        distribution=PYTORCH if count > 1 else None,
        experiment_name="serverless-tests",
        **kwargs,
    )
    return ml.jobs.create_or_update(job)


def _serverless_usage(ml: Any) -> dict[str, int]:
    """``currentValue`` of the ``Serverless`` compute-level usage entries, by usage name."""
    return {
        u.__dict__["name"]["value"]: u.__dict__["currentValue"]
        for u in ml.compute.list_usage()
        if "/computes/Serverless/usages/" in u.__dict__["id"]
    }


def test_serverless_job_runs_on_instance_count_nodes(sls, sml):
    job = serverless(sml, PRINT_ENV, count=3)
    assert job.compute is None  # nothing named: serverless
    assert sls.wait_job(job.name, 30) == "Completed"
    nodes = sls.job_nodes(job.name)
    assert [n["rank"] for n in nodes] == [0, 1, 2]
    assert len({n["ip"] for n in nodes}) == 3
    for rank in range(3):
        env = node_env(sls, job.name, rank)["env"]
        assert env["AZUREML_NODE_COUNT"] == "3" and env["WORLD_SIZE"] == "3"
        assert env["RANK"] == str(rank) and env["MASTER_ADDR"] == nodes[0]["ip"]
    got = sml.jobs.get(job.name)
    assert got.compute is None
    assert (got.resources.instance_type, got.resources.instance_count) == ("Standard_E8s_v3", 3)
    # the job's nodes are not a compute of the workspace, and went with the job
    assert [c.name for c in sml.compute.list()] == ["cpu-cluster"]
    assert sls.computes() == {"cpu-cluster": "Succeeded"}
    assert sls.vcpus_in_use("standardESv3Family") == 0


def test_compute_named_serverless_is_serverless_too(sls, sml):
    from azure.ai.ml import command
    from azure.ai.ml.entities import JobResourceConfiguration

    job = sml.jobs.create_or_update(
        command(
            command="echo hello",
            compute="serverless",  # azure-ai-ml's SERVERLESS_COMPUTE
            environment=ENV,
            resources=JobResourceConfiguration(instance_type="Standard_D4s_v3", instance_count=1),
        )
    )
    assert sls.wait_job(job.name, 30) == "Completed"
    assert "hello" in sls.node_log(job.name, 0)


@pytest.mark.slow
def test_spot_job_uses_low_priority_quota_and_can_be_preempted(sls, sml):
    job = serverless(sml, "echo ready; sleep 60", count=2, tier="Spot")
    assert getattr(sml.jobs.get(job.name).queue_settings, "job_tier", None) == "spot"
    wait_log(sls, job.name, 1, "ready")
    assert sls.vcpus_in_use(tier="LowPriority") == 16
    assert sls.vcpus_in_use("standardESv3Family") == 0  # not dedicated quota
    assert _serverless_usage(sml)["Standard ESv3 Family Cluster LowPriority vCPUs"] == 16
    sls.preempt_node(job.name, 0)
    assert sls.wait_job(job.name, 20) == "Failed"
    error = sls.job_error(job.name)
    assert error["code"] == "JobPreempted" and "PreemptionError" in error["message"]
    assert sls.vcpus_in_use(tier="LowPriority") == 0


@pytest.mark.slow
def test_serverless_job_waits_for_quota_other_jobs_hold(sls, sml):
    first = serverless(sml, "echo ready; sleep 60", count=2)  # 16 of 24 vCPUs
    try:
        wait_log(sls, first.name, 1, "ready")
        second = serverless(sml, "echo second ran", count=2)  # fits 24, not what is left
        wait_for(lambda: sls.job_queue_reason(second.name), 10, "the quota wait")
        assert "must wait in a queue until quota is available" in sls.job_queue_reason(second.name)
        assert sls.job_status(second.name) == "Queued"
    finally:
        sml.jobs.begin_cancel(first.name).result(timeout=30)
    assert sls.wait_job(second.name, 20) == "Completed"


def test_what_aml_refuses_is_refused_at_submit(sls, sml):
    from azure.core.exceptions import HttpResponseError

    before = set(sls.active_jobs())
    with pytest.raises(HttpResponseError, match="VM size 'Standard_Nope' is not supported") as info:
        serverless(sml, "echo never", instance_type="Standard_Nope")
    assert info.value.status_code == 400 and "Standard_E8s_v3" in str(info.value)
    # more instances than the family quota can ever hold (24 vCPUs = 3 nodes)
    with pytest.raises(HttpResponseError, match="Decrease the instance count to 3") as info:
        serverless(sml, "echo never", count=4)
    assert info.value.status_code == 400
    # no quota at all for the family (NCSv3 defaults to the family limit; set it to 0)
    sls.set_quota(0, family="standardNCSv3Family")
    try:
        with pytest.raises(HttpResponseError, match="Select a different VM size"):
            serverless(sml, "echo never", instance_type="Standard_NC6s_v3")
    finally:
        sls.set_quota(1000, family="standardNCSv3Family")
    assert set(sls.active_jobs()) == before


@pytest.mark.slow
def test_serverless_jobs_get_a_network_namespace_each(tmp_path):
    """In the isolated mode each serverless job's nodes are a network of their own."""
    from aml_emulator.netns import IsolatedNetwork, NetworkNamespaceError

    try:
        import asyncio

        asyncio.run(asyncio.wait_for(IsolatedNetwork().check(), 30))
    except NetworkNamespaceError as exc:
        pytest.fail(f"no network namespaces on this machine (this test needs them): {exc}")
    config = EmulatorConfig(
        computes=[ComputeSpec("cpu-cluster", max_nodes=1, ssh_public_access=False)],
        environments=[EnvironmentSpec(name="dask-env", version="1")],
        build_environments=False,
        network="isolated",
        workdir=str(tmp_path),
    )
    with Emulator(config=config) as emu:
        ml = emu.ml_client()
        jobs = [serverless(ml, "echo ready; sleep 60", count=2) for _ in range(2)]
        for job in jobs:
            wait_log(emu, job.name, 1, "ready")
        spaces = [
            {os.readlink(f"/proc/{n['pid']}/ns/net") for n in emu.job_nodes(job.name)}
            for job in jobs
        ]
        mine = os.readlink("/proc/self/ns/net")
        assert all(len(s) == 1 for s in spaces)  # a job's nodes share one namespace
        assert spaces[0] != spaces[1] and mine not in spaces[0] | spaces[1]
        network = emu.node_network
        assert network is not None and len(network.holder_pids) == 2
        for job in jobs:
            ml.jobs.begin_cancel(job.name).result(timeout=30)
        # the namespaces go with their jobs
        wait_for(lambda: not network.holder_pids, 20, "the serverless namespaces closed")
