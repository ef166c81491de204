"""scale() and adapt() with extra AML worker jobs, on the emulator (real processes)."""

from __future__ import annotations

import time

import pytest
from _helpers import FAST_CLUSTER, wait_for
from azure.core.pipeline.policies import SansIOHTTPPolicy
from distributed import Client

from aml_emulator import ComputeSpec, Emulator
from dask_amlcompute import AmlComputeCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    computes = [
        ComputeSpec(name="scale-cluster", max_nodes=3),
        ComputeSpec(name="busy", max_nodes=2),
    ]
    with Emulator(computes=computes) as emulator:
        yield emulator


def make(emu, ml=None, **extra):
    kwargs = {"compute": "scale-cluster", "n_nodes": 1, "job_timeout": "10m", **FAST_CLUSTER}
    return AmlComputeCluster(ml or emu.ml_client(), **{**kwargs, **extra})


class EnvironmentPuts(SansIOHTTPPolicy):
    """Counts the SDK's environment uploads (PUT .../environments/...)."""

    count = 0

    def on_request(self, request):
        req = request.http_request
        if req.method == "PUT" and "/environments/" in req.url:
            self.count += 1


def cluster_jobs(emu, cluster):
    return [j for j in emu.active_jobs() if j.startswith(cluster.name)]


def test_scale_up_and_down_submits_and_cancels_worker_jobs(emu):
    puts = EnvironmentPuts()
    with make(emu, emu.ml_client(per_call_policies=[puts])) as cluster, Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        cluster.scale(10)  # clipped to the compute's max_nodes, and said
        client.wait_for_workers(3, timeout=60)
        assert emu.nodes_in_use("scale-cluster") == 3
        assert any("at most 3 nodes" in msg for _, msg in cluster._cluster_manager_logs)
        worker_jobs = [j for j in cluster.jobs if j != cluster.main_job_name]
        assert len(worker_jobs) == 2  # main + 2 worker jobs, never more than max_nodes
        assert len(client.scheduler_info()["workers"]) == 3
        # a worker job ends no later than the cluster: what was left of its 10 minutes
        assert all(emu.ml_client().jobs.get(j).limits.timeout < 600 for j in worker_jobs)
        future = client.scatter(list(range(1000)), broadcast=False)
        cluster.scale(1)
        wait_for(
            lambda: len(client.scheduler_info()["workers"]) == 1,
            timeout=60,
            what="scale down to 1 worker",
        )
        for job in worker_jobs:
            assert emu.wait_job(job, timeout=30) == "Canceled"
        wait_for(lambda: emu.nodes_in_use("scale-cluster") == 1, timeout=60, what="nodes released")
        assert sum(client.gather(future)) == sum(range(1000))  # data moved, not lost
        cluster.scale(nodes=2)
        client.wait_for_workers(2, timeout=60)
        assert emu.nodes_in_use("scale-cluster") == 2
        # the environment went up once, with the main job; worker jobs name what AML registered
        assert puts.count == 1
        ml = emu.ml_client()
        main_env = ml.jobs.get(cluster.main_job_name).environment
        assert {ml.jobs.get(j).environment for j in cluster.jobs} == {main_env}
    wait_for(lambda: not cluster_jobs(emu, cluster), timeout=60, what="no job left after close")
    assert emu.nodes_in_use("scale-cluster") == 0


def test_widget_controls_then_adapt_grows_under_load_and_shrinks_to_minimum(emu):
    with make(emu) as cluster, Client(cluster) as client:
        # the notebook widget's scale and adapt controls
        tab = cluster._widget()
        accordion = tab.children[1].children[1]
        (request, scale_button), (minimum, maximum, adapt_button) = (
            accordion.children[0].children,
            accordion.children[1].children,
        )
        request.value = 2
        scale_button.click()
        client.wait_for_workers(2, timeout=60)
        assert len([j for j in cluster.jobs if j != cluster.main_job_name]) == 1
        minimum.value, maximum.value = 1, 3
        adapt_button.click()
        assert cluster._adaptive is not None
        assert (cluster._adaptive.minimum, cluster._adaptive.maximum) == (1, 3)
        assert cluster.name in tab.children[0].value  # the status tab shows the cluster

        # adapt with short intervals (replaces the widget's), under load and idle
        cluster.adapt(minimum=1, maximum=3, interval="300ms", wait_count=3, target_duration="1s")

        def slow(x):
            time.sleep(0.3)
            return x * 2

        futures = client.map(slow, range(60))
        wait_for(
            lambda: len(client.scheduler_info()["workers"]) == 3, timeout=60, what="adapt to grow"
        )
        results = client.gather(futures)
        del futures  # results are safe on the client; the workers may now go
        assert results == [x * 2 for x in range(60)]
        wait_for(
            lambda: len(client.scheduler_info()["workers"]) == 1, timeout=60, what="adapt to shrink"
        )
        wait_for(lambda: emu.nodes_in_use("scale-cluster") == 1, timeout=60, what="nodes released")
        # SpecCluster drops a worker group once its close() returns, just after AML released it
        wait_for(lambda: cluster.workers.keys() == {f"{cluster.name}-main"}, timeout=30,
                 what="worker jobs gone from cluster.workers")  # fmt: skip


def test_worker_job_queues_while_other_jobs_hold_the_nodes(emu):
    from azure.ai.ml import command
    from azure.ai.ml.entities import Environment

    ml = emu.ml_client()
    with make(emu, compute="busy") as cluster, Client(cluster) as client:
        blocker = ml.jobs.create_or_update(
            command(
                command="sleep 120",
                compute="busy",
                environment=Environment(image="mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04"),
                experiment_name="other-user",
            )
        )
        wait_for(
            lambda: emu.job_status(blocker.name) == "Running", timeout=60, what="blocker running"
        )
        cluster.scale(2)
        wait_for(lambda: "Queued" in cluster.jobs.values(), timeout=30, what="worker job queued")
        time.sleep(1)
        assert len(client.scheduler_info()["workers"]) == 1  # a queued job is not a worker
        ml.jobs.begin_cancel(blocker.name).result()
        client.wait_for_workers(2, timeout=60)
