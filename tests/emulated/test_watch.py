"""Watching a running cluster's AML jobs: one job list per watch interval, however many jobs."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from _helpers import FAST_CLUSTER, wait_for
from distributed import Client

from aml_emulator import ComputeSpec, Emulator
from dask_amlcompute import AmlComputeCluster
from dask_amlcompute._protocol import cluster_key_tag
from dask_amlcompute.backend.ops import JobInfo
from dask_amlcompute.backend.state import ClusterPlan, ClusterState, Lifecycle
from dask_amlcompute.backend.watch import poll_jobs

COMPUTE = "watch-cluster"
IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04"


@pytest.fixture(scope="module")
def emu():
    with Emulator(computes=[ComputeSpec(name=COMPUTE, max_nodes=6)]) as emulator:
        yield emulator


def make(emu: Emulator, **extra: Any) -> AmlComputeCluster:
    kwargs = {
        "compute": COMPUTE,
        "n_nodes": 1,
        "nodes_per_job": 1,
        "memory_limit": "300MB",
        "job_timeout": "10m",
        **FAST_CLUSTER,
    }
    return AmlComputeCluster(emu.ml_client(), **{**kwargs, **extra})


def job_requests(emu: Emulator) -> tuple[int, int]:
    """``GET /jobs`` (list) and ``GET /jobs/{name}`` requests the emulator answered so far."""
    counts = requests.get(emu.base_url + "/emulator/status", timeout=10).json()["requests"]
    return counts.get("GET JobsHandler", 0), counts.get("GET JobHandler", 0)


def submit(ml: Any, tags: dict[str, str], cmd: str = "echo done") -> Any:
    from azure.ai.ml import command
    from azure.ai.ml.entities import Environment

    job = command(
        command=cmd, compute=COMPUTE, environment=Environment(image=IMAGE), tags=tags,
        experiment_name="watch-tests",
    )  # fmt: skip
    return ml.jobs.create_or_update(job)


@pytest.mark.slow
def test_job_list_filters_by_tag_key_and_keeps_ended_jobs(emu):
    ml = emu.ml_client()
    first = submit(ml, {"watch-a": "1"})
    second = submit(ml, {"watch-b": "1"})
    assert emu.wait_job(first.name, 30) == "Completed"
    emu.wait_job(second.name, 30)
    listed = {j.name: j for j in ml.jobs.list(tag="watch-a")}
    assert set(listed) == {first.name}  # the key filters, whatever its value
    assert str(getattr(listed[first.name].status, "value", "")) == "Completed"  # not archived
    assert not list(ml.jobs.list(tag="watch-a=1"))  # a key, not key=value
    assert {first.name, second.name} <= {j.name for j in ml.jobs.list()}


@pytest.mark.slow
@pytest.mark.parametrize("worker_jobs", [1, 4])
def test_job_requests_per_interval_do_not_grow_with_worker_jobs(emu, worker_jobs):
    window = 8.0  # seconds, with watch_interval=1
    with make(emu) as cluster, Client(cluster) as client:
        cluster.scale(1 + worker_jobs)
        client.wait_for_workers(1 + worker_jobs, timeout=120)
        wait_for(lambda: set(cluster.jobs.values()) == {"Running"}, timeout=30, what="running")
        time.sleep(2)  # steady state: submissions and startup reads are over
        lists0, gets0 = job_requests(emu)
        time.sleep(window)
        lists1, gets1 = job_requests(emu)
        assert set(cluster.jobs.values()) == {"Running"}
    intervals = window / FAST_CLUSTER["watch_interval"]
    assert 0 < lists1 - lists0 <= intervals + 1
    assert gets1 - gets0 == 0  # every job of the cluster is in the list: no GET per job
    assert lists1 - lists0 + gets1 - gets0 <= intervals + 1


@pytest.mark.slow
def test_failed_worker_job_is_noticed_and_replaced_by_adapt(emu):
    with make(emu) as cluster, Client(cluster) as client:
        cluster.adapt(minimum=2, maximum=2, interval="300ms")
        client.wait_for_workers(2, timeout=60)
        (job,) = [j for j in cluster.jobs if j != cluster.main_job_name]
        emu.fail_node(job, 0)
        assert emu.wait_job(job, timeout=30) == "Failed"
        wait_for(lambda: cluster.jobs.get(job) == "Failed", timeout=15, what="failure noticed")
        wait_for(
            lambda: any(
                s == "Running" and j not in (job, cluster.main_job_name)
                for j, s in cluster.jobs.items()
            ),
            timeout=60,
            what="replacement worker job",
        )
        client.wait_for_workers(2, timeout=60)
        assert client.submit(sum, [1, 2]).result() == 3
        assert cluster.ended_reason is None


@pytest.mark.slow
def test_main_job_ending_is_reported_with_its_reason(emu):
    with make(emu) as cluster:
        cluster.scale(2)
        wait_for(lambda: len(cluster.jobs) == 2, timeout=30, what="worker job submitted")
        emu.fail_node(cluster.main_job_name, 0)
        wait_for(lambda: cluster.ended_reason, timeout=30, what="the cluster's end reported")
        assert "Failed: a node of the main job failed or was lost" in cluster.ended_reason
        assert "AML says:" in cluster.ended_reason
        assert cluster.jobs[cluster.main_job_name] == "Failed"
        worker_job = next(j for j in cluster.jobs if j != cluster.main_job_name)
        assert emu.wait_job(worker_job, timeout=30) == "Canceled"  # nothing is left running


# -- poll_jobs without AML -------------------------------------------------------------


class FakeOps:
    """Answers the job list with ``listed`` and ``GET /jobs/{name}`` with ``jobs``."""

    def __init__(self, listed: dict[str, str], jobs: dict[str, str]) -> None:
        self.listed, self.jobs = listed, jobs
        self.calls: list[str] = []

    async def list_job_infos(self, tag: str) -> dict[str, JobInfo]:
        self.calls.append(f"list {tag}")
        return {n: JobInfo(n, s) for n, s in self.listed.items()}

    async def get_job(self, name: str) -> JobInfo:
        self.calls.append(f"get {name}")
        return JobInfo(name, self.jobs[name])


def context(ops: FakeOps) -> Any:
    state = ClusterState(name="c", plan=ClusterPlan("create", None), lifecycle=Lifecycle.RUNNING)
    return SimpleNamespace(
        settings=SimpleNamespace(name="c"), ops=ops, state=state, log=lambda _: None
    )


def test_poll_lists_once_and_gets_only_jobs_missing_from_the_list():
    ops = FakeOps(
        listed={"c-main": "Running", "c-w0": "Running", "c-w1": "Failed", "other": "Running"},
        jobs={"c-w2": "Canceled"},  # e.g. archived
    )
    ctx = context(ops)
    ended: list[tuple[str, str]] = []

    async def on_end(info: JobInfo) -> None:
        ended.append((info.name, info.status))

    for name in ("c-main", "c-w0", "c-w1", "c-w2"):
        ctx.state.watched[name] = on_end
    asyncio.run(poll_jobs(ctx))
    assert ops.calls == [f"list {cluster_key_tag('c')}", "get c-w2"]
    assert sorted(ended) == [("c-w1", "Failed"), ("c-w2", "Canceled")]
    assert set(ctx.state.watched) == {"c-main", "c-w0"}  # ended jobs are no longer watched
    assert ctx.state.jobs == {"c-main": "Running", "c-w0": "Running", "c-w1": "Failed",
                              "c-w2": "Canceled"}  # fmt: skip


def test_poll_reports_the_main_job_from_finalizing_and_nothing_while_closing():
    ops = FakeOps(listed={"c-main": "Finalizing", "c-w0": "Failed"}, jobs={})
    ctx = context(ops)
    ended: list[str] = []

    async def on_end(info: JobInfo) -> None:
        ended.append(info.name)

    ctx.state.watched.update({"c-main": on_end})
    asyncio.run(poll_jobs(ctx))
    assert ended == ["c-main"]
    ctx.state.lifecycle = Lifecycle.CLOSING
    ctx.state.watched.update({"c-w0": on_end})
    asyncio.run(poll_jobs(ctx))
    assert ended == ["c-main"] and not ctx.state.watched
    ctx.state.watched.clear()
    asyncio.run(poll_jobs(ctx))  # nothing watched: no request
    assert ops.calls == [f"list {cluster_key_tag('c')}"] * 2


def test_a_status_gone_back_in_the_list_only_is_confirmed_with_one_get():
    from dask_amlcompute.backend.jobs import MainJob

    ops = FakeOps(listed={"c-main": "Preparing"}, jobs={"c-main": "Running"})  # the list lags
    ctx = context(ops)
    ctx.state.jobs["c-main"] = "Running"
    ctx.state.watched["c-main"] = lambda info: None
    main = MainJob.__new__(MainJob)  # only what _main_update reads
    main.context, main.job_name = ctx, "c-main"
    ctx.state.on_main_update = main._main_update
    asyncio.run(poll_jobs(ctx))
    assert ops.calls == [f"list {cluster_key_tag('c')}", "get c-main"]
    assert ctx.state.lost_reason is None and ctx.state.jobs["c-main"] == "Running"
