"""plan_cluster decides once, before submitting: compute, size, price, quota, GPUs (unit)."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from dask_amlcompute.backend.ops import ComputeInfo
from dask_amlcompute.backend.plan import draft_plan, plan_cluster
from dask_amlcompute.config import resolve_settings

GPU = SimpleNamespace(name="Standard_NC24ads_A100_v4", family="ncA100", vCPUs=24, gpus=2)
#: The family line fits two nodes (48 vCPUs), but only once other jobs release 24 of theirs.
USAGE = SimpleNamespace(
    type="Microsoft.MachineLearningServices/vmFamily/usages",
    name={"value": "ncA100 Cluster Dedicated vCPUs"},
    limit=72,
    current_value=48,
)


class Ops:
    """What plan_cluster asks of AML, answered from fixed lists; records the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def get_compute(self, name: str) -> ComputeInfo:
        self.calls.append("get_compute")
        return ComputeInfo(name=name, type="amlcompute", vm_size=GPU.name, max_nodes=4)

    async def get_job_entity(self, name: str) -> None:
        self.calls.append(f"get_job_entity {name}")

    async def check_environment(self, reference: str) -> None:
        self.calls.append("check_environment")

    async def list_sizes(self) -> list:
        return [GPU]

    async def list_usage(self) -> list:
        if "list_usage" not in self.calls:  # AmlOps reads it once, whoever asks
            self.calls.append("list_usage")
        return [USAGE]

    async def register_code(self, folder: str) -> str:
        self.calls.append("register_code")
        return "/subscriptions/s/.../codes/c/versions/1"

    async def register_environment(self, environment) -> str:
        self.calls.append(f"register_environment {environment.image}")
        return "CliV2AnonymousEnvironment:1"


def _plan(mode: str) -> tuple:
    settings = resolve_settings(
        compute="gpus", n_nodes=2, name="p", connect="direct", environment="my/image:1"
    )
    ops, logs = Ops(), []
    draft = draft_plan(settings, None, mode)
    return asyncio.run(plan_cluster(settings, ops, draft, logs.append)), ops, logs  # type: ignore[arg-type]


def test_a_new_cluster_is_planned_with_size_price_quota_and_gpus():
    plan, ops, logs = _plan("create")
    checks = ["get_compute", "get_job_entity p-main", "check_environment", "list_usage"]
    registered = ["register_code", "register_environment my/image:1"]
    assert sorted(ops.calls) == sorted(checks + registered)  # at once: in any order
    assert ops.calls[-1] == registered[1]  # once the checks passed
    # the job PUT names both: the SDK registers nothing on the critical path
    assert plan.environment == "CliV2AnonymousEnvironment:1"
    assert plan.code == "/subscriptions/s/.../codes/c/versions/1"
    assert plan.mode == "create" and plan.compute.name == "gpus" and not plan.created_compute
    assert plan.vm_size.name == GPU.name and plan.gpus_per_node == 2
    assert plan.queue_hint == (
        "waiting for vCPU quota: 48 needed, 24 of 72 free in "
        "'ncA100 Cluster Dedicated vCPUs' when it was submitted"
    )
    assert any("one dask-cuda worker per GPU" in line for line in logs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.gpus_per_node = 0  # type: ignore[misc]


def test_attaching_checks_neither_name_nor_quota_and_keeps_the_workers_it_finds():
    plan, ops, _ = _plan("attach")
    assert ops.calls == ["get_compute"]
    assert plan.mode == "attach" and plan.vm_size.name == GPU.name and plan.gpus_per_node == 0
