"""Live tests against a real Azure ML workspace (the `external` tier).

Skipped unless AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME and
AZUREML_COMPUTE are set (see tests/conftest.py); credentials come from
DefaultAzureCredential (`az login`, a service principal in AZURE_CLIENT_ID/SECRET/TENANT_ID,
or a managed identity). Optional: AZUREML_ENVIRONMENT (a registered node environment with
this client's versions and dask-amlcompute installed; default: the pinned inline
environment, which needs `node_package=` to install dask-amlcompute on the nodes, see
docs/environment.md), DASK_AMLCOMPUTE__CONNECT=ssh plus SSH settings when running outside
the workspace's VNet. Each test cancels what it started.

Run: python -m pytest -m external tests/test_external.py
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.external, pytest.mark.slow]


@pytest.fixture(scope="module")
def live_ml_client():
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    return MLClient(
        DefaultAzureCredential(),
        subscription_id=os.environ["AZURE_SUBSCRIPTION_ID"],
        resource_group_name=os.environ["AZURE_RESOURCE_GROUP"],
        workspace_name=os.environ["AZUREML_WORKSPACE_NAME"],
    )


@pytest.fixture
def live_kwargs():
    out = {
        "compute": os.environ["AZUREML_COMPUTE"],
        "job_timeout": "45m",
        "startup_timeout": "30m",
        "experiment_name": "dask-amlcompute-live-tests",
        "no_client_timeout": "10m",
    }
    if os.environ.get("AZUREML_ENVIRONMENT"):
        out["environment"] = os.environ["AZUREML_ENVIRONMENT"]
    return out


def test_live_compute_is_amlcompute(live_ml_client):
    import asyncio

    from dask_amlcompute.backend.ops import AmlOps

    info = asyncio.run(AmlOps(live_ml_client).get_compute(os.environ["AZUREML_COMPUTE"]))
    assert info.type.lower() == "amlcompute" and info.max_nodes >= 2


def test_live_two_node_cluster_runs_a_workload_and_cleans_up(live_ml_client, live_kwargs):
    import dask.bag as db
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster
    from dask_amlcompute.discovery import list_cluster_jobs

    with (
        AmlComputeCluster(live_ml_client, n_nodes=2, **live_kwargs) as cluster,
        Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) >= 2
        assert (
            db.from_sequence(range(1000), npartitions=8).map(lambda x: x * 2).sum().compute()
            == 999000
        )
        assert sum(client.gather(client.map(lambda x: x + 1, range(100)))) == 5050
        name = cluster.name
    running = [j for j in list_cluster_jobs(live_ml_client) if j.cluster == name]
    assert all(
        j.status in ("Finalizing", "Completed", "Canceled", "CancelRequested") for j in running
    )


def test_live_wrong_compute_name_is_a_clear_error(live_ml_client, live_kwargs):
    from dask_amlcompute import AmlComputeCluster, ComputeNotFoundError

    live_kwargs["compute"] = "dask-amlcompute-no-such-compute"
    with pytest.raises(ComputeNotFoundError, match="Computes that exist"):
        AmlComputeCluster(live_ml_client, n_nodes=2, **live_kwargs)


@pytest.mark.parametrize(
    "environment", ["dask-amlcompute-no-such-env@latest", "dask-amlcompute-no-such-env:7"]
)
def test_live_missing_environment_is_refused_before_submitting(
    live_ml_client, live_kwargs, environment
):
    # the environments.get / environments.list paths against the real service, and no job
    from dask_amlcompute import AmlComputeCluster, EnvironmentNotFoundError
    from dask_amlcompute.discovery import list_cluster_jobs

    live_kwargs["environment"] = environment
    name = "dask-live-noenv-" + os.urandom(4).hex()
    with pytest.raises(EnvironmentNotFoundError, match="Environments that exist"):
        AmlComputeCluster(live_ml_client, n_nodes=1, name=name, **live_kwargs)
    assert not [j for j in list_cluster_jobs(live_ml_client) if j.cluster == name]
