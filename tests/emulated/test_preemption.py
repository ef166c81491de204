"""A preempted main job that AML runs again: the client never keeps using the new scheduler."""

from __future__ import annotations

import pytest
from _helpers import wait_for
from distributed import Client

from dask_amlcompute import AmlComputeCluster, ClusterLostError

pytestmark = pytest.mark.slow


def test_requeued_main_job_is_detected_and_the_cluster_lost(emulator, ml_client, cluster_kwargs):
    with AmlComputeCluster(ml_client, n_nodes=1, **cluster_kwargs) as cluster:
        job = cluster.main_job_name
        first_id = cluster.scheduler.scheduler_id
        with Client(cluster) as client:
            assert client.submit(lambda: 1).result() == 1
        emulator.preempt_node(job, 0, requeue=True)  # AML runs the job again, on a new VM
        # the job goes back to the queue and starts a new scheduler (same slot: same address)
        wait_for(lambda: cluster.ended_reason, timeout=60, what="the cluster noticing the re-run")
        reason = cluster.ended_reason
        assert "again" in reason and "Start a new cluster" in reason
        with pytest.raises(ClusterLostError, match="again"):
            cluster.scale(3)
        with pytest.raises(ClusterLostError):
            cluster.adapt(minimum=1, maximum=2)
        # nothing is left running: the re-run job is cancelled
        assert emulator.wait_job(job, timeout=60) == "Canceled"
        assert first_id and first_id.startswith("Scheduler-")


def test_preemption_that_fails_the_job_is_reported_with_aml_s_reason(
    emulator, ml_client, cluster_kwargs
):
    with AmlComputeCluster(ml_client, n_nodes=1, **cluster_kwargs) as cluster:
        job = cluster.main_job_name
        emulator.preempt_node(job, 0)  # AML fails the job instead of running it again
        wait_for(lambda: cluster.ended_reason, timeout=60, what="the cluster noticing the end")
        assert "PreemptionError: Nodes of this job got pre-empted" in cluster.ended_reason
        assert "dedicated compute" in cluster.ended_reason
        with pytest.raises(ClusterLostError, match="PreemptionError"):
            cluster.scale(2)
        assert emulator.job_status(job) == "Failed"
