"""Serverless clusters: AmlComputeCluster(instance_type=..., n_nodes=...) with no compute."""

from __future__ import annotations

import pytest

from dask_amlcompute import AmlComputeCluster, ConfigurationError
from dask_amlcompute.config import resolve_settings

SIZE = "Standard_D4s_v3"  # emulator catalogue: 4 vCPUs, $0.19/h standard, $0.04/h low priority


@pytest.fixture
def serverless_kwargs(cluster_kwargs):
    return {k: v for k, v in cluster_kwargs.items() if k != "compute"}


def test_serverless_settings():
    s = resolve_settings(instance_type=SIZE, n_nodes=2)
    assert (s.compute, s.instance_type, s.job_tier, s.serverless_network) == (
        None,
        SIZE,
        "standard",
        False,
    )
    assert resolve_settings(instance_type=SIZE, job_tier="Spot").job_tier == "spot"
    for kwargs, match in [
        ({"instance_type": SIZE, "compute": "cpu-cluster"}, "leave compute unset"),
        ({"instance_type": SIZE, "job_tier": "premium"}, "job_tier"),
        ({"instance_type": "not a size"}, "instance_type must match"),
        (
            {"instance_type": SIZE, "create_compute": {"size": SIZE, "max_nodes": 2}},
            "need no compute",
        ),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            resolve_settings(**kwargs)


def test_serverless_cluster_runs_the_workload_and_stays_its_size(
    emulator, ml_client, serverless_kwargs
):
    import dask.bag as db
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client

    with (
        AmlComputeCluster(ml_client, instance_type=SIZE, n_nodes=2, **serverless_kwargs) as cluster,
        Client(cluster) as client,
    ):
        job = ml_client.jobs.get(cluster.main_job_name)
        assert job.compute in (None, "serverless")
        assert job.resources.instance_type == SIZE and job.resources.instance_count == 2
        assert str(job.queue_settings.job_tier).lower() == "standard"
        assert "$0.19/h per node, $0.38/h for 2 node(s)" in repr(cluster)
        assert f"serverless {SIZE}" in cluster._repr_html_()
        df = dd.from_pandas(pd.DataFrame({"k": [i % 3 for i in range(300)], "v": range(300)}), 4)
        assert df.groupby("k").v.sum().compute().to_dict() == {
            k: sum(v for v in range(300) if v % 3 == k) for k in range(3)
        }
        assert (
            db.from_sequence(range(10), npartitions=2).map(lambda x: x * x).sum().compute() == 285
        )
        assert sum(client.gather(client.map(lambda x: x + 1, range(50)))) == 1275
        # one serverless job is the cluster: no worker jobs (they may not reach the scheduler)
        with pytest.raises(ConfigurationError, match="serverless_network=True"):
            cluster.scale(10)
        with pytest.raises(ConfigurationError, match="cannot add worker jobs"):
            cluster.adapt(maximum=10)
        assert [j for j in cluster.jobs if j != cluster.main_job_name] == []


def test_spot_serverless_and_a_shared_network_allows_worker_jobs(
    emulator, ml_client, serverless_kwargs
):
    with AmlComputeCluster(
        ml_client,
        instance_type=SIZE,
        job_tier="spot",
        n_nodes=1,
        serverless_network=True,
        **serverless_kwargs,
    ) as cluster:
        job = ml_client.jobs.get(cluster.main_job_name)
        assert str(job.queue_settings.job_tier).lower() == "spot"
        assert "$0.04/h per node" in repr(cluster)  # Spot: the low-priority price
        cluster.scale(nodes=2)
        cluster.sync(_wait_workers, cluster, 2)
        workers = [j for j in cluster.jobs if j != cluster.main_job_name]
        assert len(workers) == 1
        assert ml_client.jobs.get(workers[0]).resources.instance_type == SIZE


async def _wait_workers(cluster, n: int) -> None:
    import asyncio

    for _ in range(600):
        info = await cluster.scheduler_comm.identity()
        if len(info["workers"]) >= n:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"fewer than {n} workers")


def test_unknown_instance_type_submits_nothing(emulator, ml_client, serverless_kwargs):
    before = set(emulator.active_jobs())
    with pytest.raises(ConfigurationError, match=r"Standard_Z9.*not offered.*Standard_D4s_v3"):
        AmlComputeCluster(ml_client, instance_type="Standard_Z9", n_nodes=1, **serverless_kwargs)
    assert set(emulator.active_jobs()) <= before  # nothing new (a closed one may end meanwhile)
