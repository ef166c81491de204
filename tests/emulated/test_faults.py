"""A small fault campaign on the emulator: every cluster-ending fault is named.

For each fault: a task in flight fails with a ``ClusterLostError`` naming the cause
when AML stops the job (rank 0 gets SIGTERM and errs the work in flight), or with
distributed's ``FutureCancelledError`` when the scheduler's node itself is gone or
the tunnel dropped; a cluster-ending fault is named in one WARNING line, in
``cluster.ended_reason`` and in the ``ClusterLostError`` the cluster's next call
raises; every job of the cluster has ended within a bound. A tunnel drop that the
tunnel survives leaves the cluster usable for new work.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time

import pytest
from _helpers import wait_for
from distributed import Client
from distributed.client import FutureCancelledError

from dask_amlcompute import AmlComputeCluster, ClusterLostError

pytestmark = pytest.mark.slow

#: Fault -> (cluster arguments, the words that must name it).
FAULTS = {
    "rank-1 node killed": ({"n_nodes": 2}, r"Failed: a node of the main job failed.*node rank 1"),
    "scheduler node killed": ({}, r"Failed: a node of the main job failed.*node rank 0"),
    "preempted, requeued": ({}, r"rank-0 node of AML job \S+ was preempted and AML requeued"),
    "job_timeout reached": ({"job_timeout": "12s"}, r"job_timeout \(12 s\) was reached"),
    "cancelled from outside": ({}, r"was Canceled outside this cluster object"),
    "tunnel drop": ({"connect": "job-ssh"}, None),
}
#: Fault -> the words of the ClusterLostError a task in flight fails with (None: distributed's
#: FutureCancelledError, the scheduler's node being gone or unreachable).
IN_FLIGHT = {
    "rank-1 node killed": r"node rank 1 failed or was preempted",
    "job_timeout reached": r"job_timeout \(12 s\) was reached",
    "cancelled from outside": r"cancelled from outside the cluster, or preempted",
}


def inject(fault: str, emulator, ml_client, cluster) -> None:
    job = cluster.main_job_name
    if fault == "rank-1 node killed":
        emulator.fail_node(job, 1)
    elif fault == "scheduler node killed":
        emulator.fail_node(job, 0)
    elif fault == "preempted, requeued":
        emulator.preempt_node(job, 0, requeue=True)
    elif fault == "cancelled from outside":
        # as from the studio or the CLI: elsewhere, while this test waits on the result
        threading.Thread(target=ml_client.jobs.begin_cancel, args=(job,), daemon=True).start()
    elif fault == "tunnel drop":
        cluster.loop.add_callback(cluster._connector.tunnel._conn.abort)
    # job_timeout reached: AML (the emulator) ends the job by itself


def slow_task(seconds: float = 1.5):
    """A task of ``seconds``, defined here so cloudpickle ships it by value (nodes lack this module)."""

    def slow(x: int) -> int:
        time.sleep(seconds)
        return x + 1

    return slow


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_is_named_and_nothing_is_left(fault, emulator, ml_client, cluster_kwargs, caplog):
    extra, cause = FAULTS[fault]
    caplog.set_level(logging.WARNING)
    rng = random.Random(f"{fault}-26")  # seeded: where in the task's run the fault lands
    with (
        AmlComputeCluster(ml_client, **{**cluster_kwargs, **extra}) as cluster,
        Client(cluster) as client,
    ):
        # in flight when the fault hits (the tunnel's cluster runs new work after it: short)
        future = client.submit(slow_task(3 if cause is None else 120), 41, pure=False)
        time.sleep(rng.uniform(0.2, 1.0))
        inject(fault, emulator, ml_client, cluster)
        if fault in IN_FLIGHT:
            with pytest.raises(ClusterLostError, match=IN_FLIGHT[fault]) as lost:
                future.result(timeout=60)
            assert "start a new cluster" in str(lost.value)
        else:
            with pytest.raises(FutureCancelledError, match="scheduler-connection-lost"):
                future.result(timeout=60)
        if cause is None:  # the tunnel survives: it says what was lost; new work runs
            wait_for(lambda: cluster._connector.tunnel.reconnects, 30, "the tunnel to reconnect")
            assert client.submit(slow_task(), 1, pure=False).result(timeout=60) == 2
            assert cluster.ended_reason is None
            assert "FutureCancelledError 'scheduler-connection-lost'" in caplog.text
        else:
            wait_for(lambda: cluster.ended_reason, 60, f"the cluster naming {fault}")
            assert re.search(cause, cluster.ended_reason, re.S), cluster.ended_reason
            assert "Start a new cluster" in cluster.ended_reason
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert any(re.search(cause, w, re.S) for w in warnings), warnings
            with pytest.raises(ClusterLostError, match=cause.split(".*")[0]):
                cluster.scale(3)
            for job in cluster.jobs:  # every job has ended, within a bound
                assert emulator.wait_job(job, timeout=30) in ("Failed", "Canceled", "Completed")
        jobs = list(cluster.jobs)
    # close accepted a cancel of whatever still ran; AML ends it moments later
    wait_for(lambda: not set(jobs) & set(emulator.active_jobs()), 30, "every job ended")


def test_a_lagging_job_list_does_not_end_a_healthy_cluster(emulator, ml_client, cluster_kwargs):
    lag = 10.0
    emulator.set_job_list_lag(lag)
    try:
        submitted = time.monotonic()
        with (
            AmlComputeCluster(ml_client, **cluster_kwargs) as cluster,
            Client(cluster) as client,
        ):
            job = cluster.main_job_name
            # the list still says the job has not started, while a GET says Running ...
            listed = {j.name: j.status for j in ml_client.jobs.list()}
            assert listed[job] in ("NotStarted", "Queued", "Preparing"), listed[job]
            assert emulator.job_status(job) == "Running"
            # ... for every watch poll of the lag window: the cluster lives through it
            time.sleep(max(0.0, submitted + lag + 2 - time.monotonic()))
            assert cluster.ended_reason is None
            assert client.submit(slow_task(), 1, pure=False).result(timeout=60) == 2
            assert emulator.job_status(job) == "Running"
    finally:
        emulator.set_job_list_lag(0)
