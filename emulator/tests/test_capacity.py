"""VM sizes, vCPU usage and quota, compute create/delete, low priority: through the real SDK.

One emulator for the module with a small quota: the ``standardDSv3Family`` has
8 dedicated vCPUs (two ``Standard_D4s_v3`` nodes), so a third node waits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from _emu_helpers import submit, wait_for, wait_log

from aml_emulator import (
    ComputeSpec,
    Emulator,
    EmulatorConfig,
    EnvironmentSpec,
    QuotaSpec,
)

DSV3 = "Standard DSv3 Family Cluster Dedicated vCPUs"
PYTORCH = {"type": "pytorch"}
ENV = "azureml:dask-env:1"


@pytest.fixture(scope="module")
def cap() -> Iterator[Emulator]:
    """An emulator with ``dsv3`` (4 x D4s_v3, quota for 2) and ``lowpri`` (2 x DS3_v2, low priority)."""
    config = EmulatorConfig(
        computes=[
            ComputeSpec(
                "dsv3",
                max_nodes=4,
                vm_size="Standard_D4s_v3",
                idle_seconds_before_scaledown=0,
                ssh_public_access=False,
            ),
            ComputeSpec(
                "lowpri",
                max_nodes=2,
                vm_size="STANDARD_DS3_V2",
                idle_seconds_before_scaledown=0,
                vm_priority="LowPriority",
                ssh_public_access=False,
            ),
        ],
        environments=[EnvironmentSpec(name="dask-env", version="1")],
        quota=QuotaSpec(
            dedicated_vcpus=100, low_priority_vcpus=50, families={"standardDSv3Family": 8}
        ),
        build_environments=False,
        compute_provisioning_delay=1.0,
    )
    with Emulator(config=config) as emu:
        yield emu


@pytest.fixture(scope="module")
def cml(cap: Emulator) -> Any:
    return cap.ml_client()


def _usages(ml: Any) -> list[dict[str, Any]]:
    """``list_usage`` entries (camelCase keys: azure-ai-ml 1.35 leaves the snake_case ones None)."""
    return [u.__dict__ for u in ml.compute.list_usage()]


def _usage(ml: Any, name: str, kind: str = "vmFamily") -> dict[str, Any]:
    """The entry named ``name`` of a type (``vmFamily``, ``dedicatedCores``, ``lowPriorityCores``)."""
    found = [u for u in _usages(ml) if u["type"].endswith(f"/{kind}/usages")]
    return next(u for u in found if u["name"]["value"] == name)


def _family_usage(ml: Any, name: str) -> dict[str, Any]:
    return _usage(ml, name)


def _cancel(ml: Any, emu: Emulator, *names: str) -> None:
    for name in names:
        ml.jobs.begin_cancel(name).result(timeout=30)
        emu.wait_job(name, 20)


def test_list_sizes_reports_vcpus_gpus_and_prices(cml):
    sizes = {s.__dict__["name"]: s.__dict__ for s in cml.compute.list_sizes()}
    nc24 = sizes["Standard_NC24s_v3"]
    assert (nc24["family"], nc24["vCPUs"], nc24["gpus"], nc24["memoryGB"]) == (
        "standardNCSv3Family",
        24,
        4,
        448.0,
    )
    ds3 = sizes["Standard_DS3_v2"]
    assert ds3["lowPriorityCapable"] and ds3["premiumIO"]
    assert "AmlCompute" in ds3["supportedComputeTypes"]
    prices = ds3["estimatedVMPrices"]
    assert (prices["billingCurrency"], prices["unitOfMeasure"]) == ("USD", "OneHour")
    tiers = {v["vmTier"]: v["retailPrice"] for v in prices["values"] if v["osType"] == "Linux"}
    assert tiers["Standard"] > tiers["LowPriority"] > 0
    assert "estimatedVMPrices" not in sizes["Standard_F4s_v2"]  # AML may omit prices
    assert sizes.keys() == {s.__dict__["name"] for s in cml.compute.list_sizes(location="local")}
    assert len(list(cml.compute.list_sizes(compute_type="AmlCompute"))) == len(sizes)
    assert list(cml.compute.list_sizes(location="westeurope")) == []


@pytest.mark.slow
def test_list_usage_counts_the_vcpus_of_nodes_in_use(cap, cml):
    assert {u["unit"] for u in _usages(cml)} == {"Count"}
    assert _family_usage(cml, DSV3)["currentValue"] == 0
    assert _family_usage(cml, DSV3)["limit"] == 8
    lp_family = _family_usage(cml, "Standard DSv2 Family Cluster LowPriority vCPUs")
    assert lp_family["limit"] == -1  # low priority: one limit across families
    job = submit(
        cml, "echo ready; sleep 60", compute="dsv3", nodes=2, distribution=PYTORCH, environment=ENV
    )
    try:
        wait_log(cap, job.name, 1, "ready")
        assert _family_usage(cml, DSV3)["currentValue"] == 8
        dedicated = _usage(cml, "Total Cluster Dedicated Regional vCPUs", "dedicatedCores")
        assert dedicated["id"] == "/subscriptions/00000000-0000-0000-0000-000000000000/usages"
        assert (dedicated["currentValue"], dedicated["limit"]) == (8, 100)
        per_compute = [u for u in _usages(cml) if "/computes/dsv3/usages/" in u["id"]]
        assert [u["currentValue"] for u in per_compute] == [8]
        assert cap.vcpus_in_use("standardDSv3Family") == 8
    finally:
        _cancel(cml, cap, job.name)
    assert _family_usage(cml, DSV3)["currentValue"] == 0  # no idle time: the VMs go


@pytest.mark.slow
def test_job_beyond_the_quota_waits_queued_and_starts_when_nodes_free(cap, cml, capsys):
    first = submit(
        cml, "echo ready; sleep 60", compute="dsv3", nodes=2, distribution=PYTORCH, environment=ENV
    )
    wait_log(cap, first.name, 1, "ready")
    # the compute has two free nodes, the family quota none
    second = submit(cml, "echo second ran", compute="dsv3", environment=ENV)
    try:
        wait_for(lambda: cap.job_queue_reason(second.name), 10, "the quota wait")
        got = cml.jobs.get(second.name)
        assert getattr(got.status, "value", got.status) == "Queued"
        reason = got.properties["emulator.queueReason"]
        assert "must wait in a queue until quota is available" in reason
        assert DSV3 in reason and "8 of 8 in use" in reason
        time.sleep(1.0)  # rechecked meanwhile, still waiting
        assert cap.job_status(second.name) == "Queued"
    finally:
        _cancel(cml, cap, first.name)
    assert cap.wait_job(second.name, 20) == "Completed"
    assert "second ran" in cap.node_log(second.name, 0)
    assert cap.job_queue_reason(second.name) is None
    assert "emulator.queueReason" not in cml.jobs.get(second.name).properties
    # the run's warnings keep it: ml.jobs.stream() prints them in its summary
    capsys.readouterr()
    cml.jobs.stream(second.name)
    summary = capsys.readouterr().out.split("Execution Summary", 1)[1]
    assert "Warnings:" in summary and "until quota is available" in summary


@pytest.mark.slow
def test_raising_the_quota_starts_a_waiting_job(cap, cml):
    cap.set_quota(4, family="standardDSv3Family")  # one D4s_v3 node
    assert _family_usage(cml, DSV3)["limit"] == 4
    first = submit(cml, "echo ready; sleep 60", compute="dsv3", environment=ENV)
    try:
        wait_log(cap, first.name, 0, "ready")
        second = submit(cml, "echo second ran", compute="dsv3", environment=ENV)
        wait_for(lambda: cap.job_queue_reason(second.name), 10, "the quota wait")
        cap.set_quota(8, family="standardDSv3Family")
        assert cap.wait_job(second.name, 20) == "Completed"
        assert cap.job_status(first.name) == "Running"
    finally:
        cap.set_quota(8, family="standardDSv3Family")
        _cancel(cml, cap, first.name)


def test_set_quota_limits_and_jobs_that_can_never_fit(cap, cml):
    cap.set_quota(0, family="standardDSv3Family")
    try:
        job = submit(cml, "echo ran", compute="dsv3", environment=ENV)
        # a limit the job can never fit: AML fails it instead of queueing it
        assert cap.wait_job(job.name, 10) == "Failed"
        error = cap.job_error(job.name)
        assert "JobNodeCountExceedsCoreQuota" in error["message"]
        assert "Standard DSv3 family vCPU quota of 0" in error["message"]
        cap.set_quota(8, family="standardDSv3Family")
        cap.set_quota(0, tier="Dedicated")  # now the regional total blocks
        job = submit(cml, "echo ran", compute="dsv3", environment=ENV)
        assert cap.wait_job(job.name, 10) == "Failed"
        assert "total vCPU quota of 0" in cap.job_error(job.name)["message"]
        total = _usage(cml, "Total Cluster Dedicated Regional vCPUs", "dedicatedCores")
        assert total["limit"] == 0
    finally:
        cap.set_quota(8, family="standardDSv3Family")
        cap.set_quota(100, tier="Dedicated")


def test_job_that_can_never_fit_the_quota_fails_at_once(cap, cml):
    job = submit(cml, "echo never", compute="dsv3", nodes=3, distribution=PYTORCH, environment=ENV)
    assert cap.wait_job(job.name, 10) == "Failed"
    message = cap.job_error(job.name)["message"]
    assert message.startswith("Job submission to AzureML Compute encountered an Exception")
    assert "requested job node count of 3 which maps to 12 vCPUs" in message
    assert cap.job_nodes(job.name) == []


@pytest.mark.slow
def test_create_use_and_delete_a_compute(cap, cml):
    from azure.ai.ml.entities import AmlCompute
    from azure.core.exceptions import ResourceNotFoundError

    poller = cml.compute.begin_create_or_update(
        AmlCompute(
            name="made-here",
            size="Standard_E8s_v3",
            min_instances=0,
            max_instances=2,
            tier="dedicated",
            idle_time_before_scale_down=30,
        )
    )
    assert cml.compute.get("made-here").provisioning_state == "Creating"
    assert cap.computes()["made-here"] == "Creating"
    created = poller.result(timeout=30)
    assert created.provisioning_state == "Succeeded"
    got = cml.compute.get("made-here")
    assert (got.size, got.max_instances, got.tier) == ("Standard_E8s_v3", 2, "dedicated")
    assert "made-here" in {c.name for c in cml.compute.list()}
    job = submit(
        cml, PRINT_NODES, compute="made-here", nodes=2, distribution=PYTORCH, environment=ENV
    )
    assert cap.wait_job(job.name, 30) == "Completed"
    assert "node 1 of 2" in cap.node_log(job.name, 1)
    usage = _family_usage(cml, "Standard ESv3 Family Cluster Dedicated vCPUs")
    assert usage["currentValue"] == 16  # two idle nodes until scale-down
    deleting = cml.compute.begin_delete("made-here")
    assert cap.computes()["made-here"] == "Deleting"
    deleting.result(timeout=30)
    assert not cap.compute_exists("made-here")
    with pytest.raises(ResourceNotFoundError):
        cml.compute.get("made-here")
    assert _family_usage(cml, "Standard ESv3 Family Cluster Dedicated vCPUs")["currentValue"] == 0


PRINT_NODES = (
    "python -c \"import os; print('node', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\""
)


@pytest.mark.slow
def test_deleting_a_compute_fails_its_running_and_queued_jobs(cap, cml):
    from azure.ai.ml.entities import AmlCompute

    cml.compute.begin_create_or_update(
        AmlCompute(name="doomed", size="Standard_E8s_v3", max_instances=1)
    ).result(timeout=30)
    running = submit(cml, "echo ready; sleep 60", compute="doomed", environment=ENV)
    wait_log(cap, running.name, 0, "ready")
    queued = submit(cml, "echo never", compute="doomed", environment=ENV)
    assert cap.wait_job(queued.name, 10, statuses=["Queued"]) == "Queued"
    cml.compute.begin_delete("doomed").result(timeout=30)
    for name in (running.name, queued.name):
        assert cap.wait_job(name, 20) == "Failed"
        assert cap.job_error(name)["message"] == "AzureMLCompute cluster doomed does not exist"
    assert all(n["exit_code"] is not None for n in cap.job_nodes(running.name))
    assert not cap.compute_exists("doomed")


def test_bad_compute_requests_are_refused_like_aml(cap, cml):
    from azure.ai.ml.entities import AmlCompute
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    for name in ("1cluster", "ab", "cpu-1", "x" * 25, "bad_name"):
        with pytest.raises(HttpResponseError, match="Compute name is invalid") as info:
            cml.compute.begin_create_or_update(AmlCompute(name=name, size="Standard_D4s_v3"))
        assert info.value.status_code == 400
    with pytest.raises(HttpResponseError, match="VM size 'Standard_Nope' is not supported") as info:
        cml.compute.begin_create_or_update(AmlCompute(name="nope", size="Standard_Nope"))
    assert info.value.status_code == 400 and "Standard_D4s_v3" in str(info.value)
    # min nodes beyond the family quota: AML's ClusterMinNodesExceedCoreQuota
    with pytest.raises(HttpResponseError, match="cannot accomodate for at least 3") as info:
        cml.compute.begin_create_or_update(
            AmlCompute(name="too-warm", size="Standard_D4s_v3", min_instances=3, max_instances=3)
        )
    assert not cap.compute_exists("too-warm") and not cap.compute_exists("nope")
    with pytest.raises(ResourceNotFoundError):
        cml.compute.begin_delete("no-such-compute")


@pytest.mark.slow
def test_low_priority_compute_is_reported_and_preempted_like_aml(cap, cml):
    got = cml.compute.get("lowpri")
    assert got.tier == "low_priority"
    job = submit(
        cml,
        "echo ready; sleep 60",
        compute="lowpri",
        nodes=2,
        distribution=PYTORCH,
        environment=ENV,
    )
    wait_log(cap, job.name, 1, "ready")
    total = _usage(cml, "Total Cluster LowPriority Regional vCPUs", "lowPriorityCores")
    assert (total["currentValue"], total["limit"]) == (8, 50)
    assert cap.vcpus_in_use(tier="LowPriority") == 8
    cap.preempt_node(job.name, 1)
    assert cap.wait_job(job.name, 20) == "Failed"
    error = cap.job_error(job.name)
    assert error["code"] == "JobPreempted" and "PreemptionError" in error["message"]
    assert cap.vcpus_in_use(tier="LowPriority") == 0


def test_sizes_and_quota_load_from_a_config_file(tmp_path):
    from aml_emulator import load_config

    path = tmp_path / "emu.yaml"
    path.write_text(
        "compute_provisioning_delay: 0.1\n"
        "quota: {dedicated_vcpus: 24, families: {standardNCSv3Family: 0}}\n"
        "vm_sizes:\n"
        "  - {name: Standard_D4s_v3, family: standardDSv3Family, vcpus: 4, memory_gb: 16,\n"
        "     prices: {Standard: 0.19, Spot: 0.04}}\n"
        "computes: [{name: lp, vm_size: standard_d4s_v3, vm_priority: low_priority}]\n"
    )
    config = load_config(path)
    assert config.compute_provisioning_delay == 0.1
    assert (config.quota.dedicated_vcpus, config.quota.families) == (24, {"standardNCSv3Family": 0})
    assert [s.name for s in config.vm_sizes] == ["Standard_D4s_v3"]
    assert config.vm_sizes[0].prices == {"Standard": 0.19, "Spot": 0.04}
    assert config.computes[0].vm_priority == "LowPriority"
    with pytest.raises(ValueError, match="price tiers"):
        load_config_text(
            tmp_path, "vm_sizes: [{name: x, family: f, vcpus: 1, memory_gb: 1, prices: {Gold: 1}}]"
        )
    with pytest.raises(ValueError, match="quota limits must be >= 0"):
        load_config_text(tmp_path, "quota: {dedicated_vcpus: -1}")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_text(tmp_path, "quota: {cores: 4}")


def load_config_text(tmp_path: Any, text: str) -> Any:
    from aml_emulator import load_config

    path = tmp_path / "other.yaml"
    path.write_text(text + "\n")
    return load_config(path)
