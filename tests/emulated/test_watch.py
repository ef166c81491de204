"""Watching a running cluster's AML jobs: one job list per watch interval, however many jobs."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from _helpers import FAST_CLUSTER, wait_for
from distributed import Client

from aml_emulator import ComputeSpec, Emulator
from dask_amlcompute import AmlComputeCluster

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
def test_job_requests_per_interval_do_not_grow_with_worker_jobs(emu):
    window = 5.0  # seconds, with watch_interval=1: 4 worker jobs would add 20 GETs
    intervals = window / FAST_CLUSTER["watch_interval"]
    with make(emu) as cluster, Client(cluster) as client:
        for worker_jobs in (1, 4):  # one cluster, grown: the same count for 1 and 4 worker jobs
            cluster.scale(1 + worker_jobs)
            client.wait_for_workers(1 + worker_jobs, timeout=120)
            wait_for(lambda: set(cluster.jobs.values()) == {"Running"}, 30, "running")
            time.sleep(2)  # steady state: submissions and startup reads are over
            lists0, gets0 = job_requests(emu)
            time.sleep(window)
            lists1, gets1 = job_requests(emu)
            assert set(cluster.jobs.values()) == {"Running"}
            assert len(cluster.jobs) == 1 + worker_jobs
            assert 0 < lists1 - lists0 <= intervals + 1, worker_jobs
            assert gets1 - gets0 == 0  # every job of the cluster is in the list: no GET per job


@pytest.mark.slow
def test_failed_worker_job_is_noticed_and_replaced_by_adapt(emu):
    with make(emu) as cluster, Client(cluster) as client:
        cluster.adapt(minimum=2, maximum=2, interval="300ms")
        client.wait_for_workers(2, timeout=60)
        ended = {cluster.main_job_name}
        # a crashed node, then a preempted one (AML fails the job): each job is replaced
        for end in (emu.fail_node, emu.preempt_node):
            (job,) = [j for j in cluster.jobs if j not in ended]
            end(job, 0)
            ended.add(job)
            assert emu.wait_job(job, timeout=30) == "Failed"
            wait_for(lambda: cluster.jobs.get(job) == "Failed", 15, "failure noticed")  # noqa: B023
            wait_for(
                lambda: any(s == "Running" and j not in ended for j, s in cluster.jobs.items()),
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
