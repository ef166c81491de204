"""Compute on demand: create_compute= and delete_compute_on_close=, through the unmodified SDK."""

from __future__ import annotations

import pytest

from dask_amlcompute import AmlComputeCluster, ConfigurationError, QuotaExceededError
from dask_amlcompute.config import ComputeRequest, compute_request

SIZE = "Standard_D4s_v3"  # the emulator's catalogue: 4 vCPUs, standardDSv3Family


def _logs(cluster) -> str:
    return "\n".join(line for _, line in cluster._cluster_manager_logs)


def test_create_compute_settings_are_checked_before_anything():
    assert compute_request({"size": SIZE, "max_nodes": 4}) == ComputeRequest(SIZE, 4)
    got = compute_request(
        {"size": SIZE, "max-nodes": 2, "tier": "low-priority", "idle_time_before_scale_down": "5m"}
    )
    assert got == ComputeRequest(SIZE, 2, "low_priority", 300)
    for bad, match in [
        ("Standard_D4s_v3", "mapping"),
        ({"max_nodes": 2}, "size"),
        ({"size": SIZE}, "max_nodes"),
        ({"size": SIZE, "max_nodes": 0}, "max_nodes"),
        ({"size": SIZE, "max_nodes": 2, "tier": "spot"}, "tier"),
        ({"size": SIZE, "max_nodes": 2, "min_nodes": 1}, "unknown key"),
        ({"size": "bad size!", "max_nodes": 2}, "size"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            compute_request(bad)
    with pytest.raises(ConfigurationError, match="could never start"):
        AmlComputeCluster(
            object(), compute="x", n_nodes=3, create_compute={"size": SIZE, "max_nodes": 2}
        )


def test_compute_is_created_used_and_deleted(emulator, ml_client, cluster_kwargs):
    import dask.bag as db
    from distributed import Client

    name = "made-here"
    assert not emulator.compute_exists(name)
    kwargs = {**cluster_kwargs, "compute": name}
    request = {"size": SIZE, "max_nodes": 3, "idle_time_before_scale_down": "5s"}
    with (
        AmlComputeCluster(
            ml_client, n_nodes=2, create_compute=request, delete_compute_on_close=True, **kwargs
        ) as cluster,
        Client(cluster) as client,
    ):
        assert emulator.compute_exists(name)
        compute = ml_client.compute.get(name)
        assert (compute.size, compute.min_instances, compute.max_instances) == (SIZE, 0, 3)
        assert compute.idle_time_before_scale_down == 5
        assert (
            db.from_sequence(range(100), npartitions=4).map(lambda x: 2 * x).sum().compute() == 9900
        )
        assert len(client.scheduler_info()["workers"]) >= 2
        logs = _logs(cluster)
        assert f"Creating AmlCompute {name}: {SIZE} (4 vCPUs), 0-3 nodes, dedicated" in logs
        assert f"Created AmlCompute {name} in" in logs
        assert "$0.19/h per node, $0.38/h for 2 node(s)" in repr(cluster)
    assert f"Deleted AmlCompute {name}" in _logs(cluster)
    assert not emulator.compute_exists(name)


def test_unknown_size_creates_nothing(emulator, ml_client, cluster_kwargs):
    before = set(emulator.active_jobs())
    kwargs = {**cluster_kwargs, "compute": "never-made"}
    with pytest.raises(ConfigurationError, match=r"Standard_Z99.*not offered.*Standard_D4s_v3"):
        AmlComputeCluster(
            ml_client, n_nodes=1, create_compute={"size": "Standard_Z99", "max_nodes": 2}, **kwargs
        )
    assert not emulator.compute_exists("never-made")
    assert set(emulator.active_jobs()) <= before  # nothing new (a closed one may end meanwhile)


def test_over_quota_creates_nothing(emulator, ml_client, cluster_kwargs):
    family = "standardDSv3Family"
    before = emulator.config.quota.families.get(family, emulator.config.quota.family_vcpus)
    emulator.set_quota(4, family=family, tier="Dedicated")  # one node
    try:
        with pytest.raises(QuotaExceededError, match=r"8 vCPUs.*at most 1 node"):
            AmlComputeCluster(
                ml_client,
                n_nodes=2,
                create_compute={"size": SIZE, "max_nodes": 2},
                **{**cluster_kwargs, "compute": "over-quota"},
            )
    finally:
        emulator.set_quota(before, family=family, tier="Dedicated")
    assert not emulator.compute_exists("over-quota")


def test_existing_compute_is_used_as_it_is_and_kept(emulator, ml_client, cluster_kwargs):
    request = {"size": SIZE, "max_nodes": 2}
    with AmlComputeCluster(
        ml_client, n_nodes=1, create_compute=request, delete_compute_on_close=True, **cluster_kwargs
    ) as cluster:
        logs = _logs(cluster)
        assert "Compute cpu-cluster exists: using it as it is" in logs
        assert "it will not be deleted on close" in logs
        assert "Creating AmlCompute" not in logs
    assert emulator.compute_exists("cpu-cluster")
    assert "Deleting AmlCompute" not in _logs(cluster)
