"""Worker jobs on a second (low-priority) compute; a preempted one is counted and replaced."""

from __future__ import annotations

import time

import pytest

from dask_amlcompute import AmlComputeCluster, ConfigurationError
from dask_amlcompute.config import resolve_settings


def test_worker_compute_settings():
    assert resolve_settings(compute="a", worker_compute="b").worker_compute == "b"
    with pytest.raises(ConfigurationError, match="serverless"):
        resolve_settings(instance_type="Standard_D4s_v3", worker_compute="b")


def test_low_priority_worker_job_is_preempted_counted_and_replaced(
    emulator, ml_client, cluster_kwargs
):
    from azure.ai.ml.entities import AmlCompute

    name = "lowpri-workers"
    ml_client.compute.begin_create_or_update(
        AmlCompute(name=name, size="Standard_DS3_v2", max_instances=2, tier="low_priority")
    ).result()
    try:
        with AmlComputeCluster(
            ml_client, n_nodes=1, worker_compute=name, **cluster_kwargs
        ) as cluster:
            logs = "\n".join(line for _, line in cluster._cluster_manager_logs)
            assert f"Worker jobs on compute {name} (low-priority, up to 2 nodes): $0.06/h" in logs
            cluster.adapt(minimum_nodes=2, maximum_nodes=2, interval="1s")
            first = _wait_worker_job(cluster, ml_client, name, exclude=set())
            assert emulator.job_status(cluster.main_job_name) == "Running"
            emulator.preempt_node(first, 0)  # AML takes the low-priority node: the job fails
            second = _wait_worker_job(cluster, ml_client, name, exclude={first})
            assert second != first
            assert cluster.preemptions == 1
            logs = "\n".join(line for _, line in cluster._cluster_manager_logs)
            assert f"Worker job {first} ended Failed: preempted (low-priority node)" in logs
        assert emulator.wait_job(cluster.main_job_name, 30) in ("Completed", "Canceled")
    finally:
        ml_client.compute.begin_delete(name).result()


def _wait_worker_job(cluster, ml_client, compute: str, exclude: set[str]) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        running = [
            j
            for j, status in cluster.jobs.items()
            if j != cluster.main_job_name and j not in exclude and status == "Running"
        ]
        if running:
            job = ml_client.jobs.get(running[0])
            assert job.compute.rstrip("/").rsplit("/", 1)[-1] == compute
            return running[0]
        time.sleep(0.3)
    raise TimeoutError(f"no new running worker job; jobs: {cluster.jobs}")
