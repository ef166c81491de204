"""Quota and price before submitting: sizes and usages read through the unmodified SDK."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from dask_amlcompute import AmlComputeCluster, QuotaExceededError, StartupTimeoutError
from dask_amlcompute.backend.capacity import (
    quotas_for,
    size_from_sdk,
)

# the emulator's cpu-cluster: Standard_DS3_v2 (4 vCPUs, standardDSv2Family, $0.29/h dedicated)
FAMILY = "standardDSv2Family"


@pytest.fixture
def quota(emulator):
    """Set the emulator's DSv2 dedicated quota for one test, then restore it."""
    before = emulator.config.quota.families.get(FAMILY, emulator.config.quota.family_vcpus)

    def set_limit(limit: int) -> None:
        emulator.set_quota(limit, family=FAMILY, tier="Dedicated")

    yield set_limit
    emulator.set_quota(before, family=FAMILY, tier="Dedicated")


def test_sizes_and_usages_through_the_sdk(ml_client, quota):
    quota(40)
    sizes = {s.name.lower(): size_from_sdk(s) for s in ml_client.compute.list_sizes()}
    ds3 = sizes["standard_ds3_v2"]
    assert (ds3.family, ds3.vcpus, ds3.gpus) == (FAMILY, 4, 0)
    assert ds3.hourly_price("dedicated") == pytest.approx(0.29)
    assert ds3.hourly_price("low_priority") == pytest.approx(0.06)
    assert any(s.gpus > 0 for s in sizes.values())  # GPU sizes are listed with their count
    lines = quotas_for(list(ml_client.compute.list_usage()), FAMILY, "dedicated")
    assert [q.name for q in lines] == [
        "Standard DSv2 Family Cluster Dedicated vCPUs",
        "Total Cluster Dedicated Regional vCPUs",
    ]
    assert lines[0].limit == 40


def test_request_over_quota_is_refused_before_submitting(
    emulator, ml_client, cluster_kwargs, quota
):
    quota(12)  # three 4-vCPU nodes at most
    before = set(emulator.active_jobs())
    with pytest.raises(QuotaExceededError) as info:
        AmlComputeCluster(ml_client, n_nodes=4, name="over-quota", **cluster_kwargs)
    message = str(info.value)
    assert "16 vCPUs" in message and "Standard DSv2 Family Cluster Dedicated vCPUs" in message
    assert "of 12 vCPUs" in message and "at most 3 node(s)" in message
    assert "request more quota" in message and "Nothing was submitted" in message
    assert set(emulator.active_jobs()) <= before  # nothing new (a closed one may end meanwhile)
    assert not [j for j in ml_client.jobs.list() if j.name.startswith("over-quota")]


def test_family_lines_spelled_by_family_id_are_checked(cluster_kwargs, caplog):
    from aml_emulator import Emulator
    from aml_emulator.config import EmulatorConfig, QuotaSpec

    config = EmulatorConfig(quota=QuotaSpec(families={FAMILY: 12}, family_value="id"))
    with Emulator(config=config) as emu:
        ml = emu.ml_client()
        usages = list(ml.compute.list_usage())
        assert FAMILY in {u.name["value"] for u in usages}  # the other spelling, served
        with pytest.raises(QuotaExceededError, match="of 12 vCPUs"):
            AmlComputeCluster(ml, n_nodes=4, name="over-quota-id", **cluster_kwargs)
        assert emu.active_jobs() == []
        # no line for the family at all: said, not silently passed
        caplog.set_level(logging.WARNING, logger="dask_amlcompute.backend.capacity")
        assert len(quotas_for(usages, "standardNoSuchFamily", "dedicated")) == 1  # the total
        assert "quota for family standardNoSuchFamily (dedicated) not reported" in caplog.text
        caplog.clear()
        quotas_for(usages, FAMILY, "low_priority")  # reported, without a limit (-1)
        assert "not reported" not in caplog.text


def test_request_that_must_wait_for_quota_queues_and_starts(emulator, ml_client, cluster_kwargs):
    """A compute of its own (no idle nodes from other tests), created and deleted through the SDK."""
    from azure.ai.ml import command
    from azure.ai.ml.entities import AmlCompute, Environment

    name, family = "quota-test", "standardDSv3Family"  # Standard_D4s_v3: 4 vCPUs
    ml_client.compute.begin_create_or_update(
        AmlCompute(
            name=name, size="Standard_D4s_v3", max_instances=3, idle_time_before_scale_down=1
        )
    ).result()
    before = emulator.config.quota.families.get(family, emulator.config.quota.family_vcpus)
    emulator.set_quota(8, family=family, tier="Dedicated")  # two nodes
    holder = ml_client.jobs.create_or_update(
        command(command="sleep 120", compute=name, environment=Environment(image="python"))
    )
    main = "waits-for-quota-main"

    def status(job: str) -> str | None:
        try:
            return emulator.job_status(job)
        except Exception:
            return None

    async def start_while_the_holder_runs() -> None:
        # AML counts scale-up and quota waits in Queued: startup_timeout does not, queue_timeout does
        kwargs = {**cluster_kwargs, "compute": name, "startup_timeout": "10s"}
        with pytest.raises(StartupTimeoutError, match="queue_timeout=2s") as info:
            await AmlComputeCluster(
                ml_client, n_nodes=2, asynchronous=True, name="queue-bound", queue_timeout="2s",
                **kwargs,
            )  # fmt: skip
        assert "waiting for vCPU quota" in str(info.value)
        cluster = AmlComputeCluster(
            ml_client, n_nodes=2, asynchronous=True, name="waits-for-quota", **kwargs
        )
        task = asyncio.ensure_future(cluster._start())
        try:

            def reason() -> str:
                return (emulator.job_queue_reason(main) if status(main) else None) or ""

            deadline = time.monotonic() + 120  # after Preparing (the environment's build)
            while not reason() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(11)  # longer than startup_timeout
            assert status(main) == "Queued"  # 4 of 8 vCPUs held by the holder
            assert "until quota is available" in reason()
            logs = "\n".join(line for _, line in cluster._cluster_manager_logs)
            assert "Quota: 8 vCPUs needed but 'Standard DSv3 Family Cluster Dedicated" in logs
            assert "may wait in Queued until enough nodes are released" in logs
            await asyncio.to_thread(lambda: ml_client.jobs.begin_cancel(holder.name).result())
            queued = [line for line in logs.splitlines() if ": Queued (" in line]
            assert queued and "waiting for vCPU quota: 8 needed, 4 of 8 free" in queued[0]
            # AML's order: the image build (Preparing), then node allocation (Queued)
            assert logs.index(": Preparing (") < logs.index(": Queued (")
            await asyncio.wait_for(task, 120)  # starts once the holder's node is free
            assert cluster.scheduler_address
        finally:
            await cluster.close()

    try:
        wait_until = time.monotonic() + 60
        while status(holder.name) != "Running" and time.monotonic() < wait_until:
            time.sleep(0.2)
        emulator.provisioning_delay = 1.0  # Preparing long enough to be seen
        asyncio.run(start_while_the_holder_runs())
    finally:
        emulator.provisioning_delay = 0.0
        ml_client.jobs.begin_cancel(holder.name).result()
        emulator.set_quota(before, family=family, tier="Dedicated")
        ml_client.compute.begin_delete(name).result()
    assert not emulator.compute_exists(name)
