"""Live tests against a real Azure ML workspace (the `external` tier).

Skipped unless AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME and
AZUREML_COMPUTE are set (see tests/conftest.py); credentials come from
DefaultAzureCredential (`az login`, a service principal in AZURE_CLIENT_ID/SECRET/TENANT_ID,
or a managed identity). Optional: AZUREML_ENVIRONMENT (a registered node environment with
this client's versions; default: the pinned inline environment, built by AML from the
package index on first use, 5-20 min; the library reaches the nodes in the code snapshot
either way, see docs/environment.md). The default connect="auto" reaches the scheduler from
outside the workspace's VNet through the job's SSH service (no SSH settings on the compute).
Each test cancels what it started.

Run: python -m pytest -m external tests/external/test_external.py
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
        "startup_timeout": "15m",
        "prepare_timeout": "40m",  # a first image build of the default environment
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
        # the cluster's one-request job watch: the REST list's tag-key filter on real AML
        import asyncio

        from dask_amlcompute._protocol import cluster_key_tag
        from dask_amlcompute.backend.ops import AmlOps

        listed = asyncio.run(AmlOps(live_ml_client).list_job_infos(cluster_key_tag(name)))
        assert set(listed) == {cluster.main_job_name}
        # rank 0 published through the MLflow REST API (azureml:// -> https .../mlflow/v2.0,
        # MLFLOW_TRACKING_TOKEN), not through the mlflow client fallback
        logs = "\n".join(cluster.get_logs(scheduler=False, workers=False).values())
        assert "publishing with the mlflow client" not in logs
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


def test_live_default_environment_builds_and_the_library_comes_from_the_snapshot(
    live_ml_client, live_kwargs
):
    # Issue 15 on real AML: the default inline environment builds from public indexes
    # and the nodes import dask-amlcompute from the job's code snapshot (their cwd).
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    live_kwargs.pop("environment", None)

    def where() -> tuple[str, str]:
        import os

        import dask_amlcompute

        return dask_amlcompute.__file__, os.getcwd()

    with (
        AmlComputeCluster(live_ml_client, n_nodes=1, **live_kwargs) as cluster,
        Client(cluster) as client,
    ):
        for library, cwd in client.run(where).values():
            assert library.startswith(cwd)
        assert "Running" in cluster.startup_phases


def test_live_uninstallable_requirement_is_an_environment_build_error(live_ml_client, live_kwargs):
    from dask_amlcompute import AmlComputeCluster, EnvironmentBuildError
    from dask_amlcompute.discovery import list_cluster_jobs

    live_kwargs.pop("environment", None)
    name = "dask-live-nobuild-" + os.urandom(4).hex()
    with pytest.raises(EnvironmentBuildError) as info:
        AmlComputeCluster(
            live_ml_client,
            n_nodes=1,
            name=name,
            pip_packages=["dask-amlcompute-no-such-package-xyz==0.0.1"],
            **live_kwargs,
        )
    # UNVERIFIED on real AML: that the build log names the requirement as pip/conda print it
    assert "Image build failed" in str(info.value)
    # list_cluster_jobs lists active jobs only: none of this cluster is left
    assert not [j for j in list_cluster_jobs(live_ml_client) if j.cluster == name]


def test_live_env_build_registers_a_named_environment(live_ml_client):
    # what `dask-amlcompute env build` does, against the real environments API
    import asyncio

    from dask_amlcompute.backend.environment import build_spec
    from dask_amlcompute.backend.ops import AmlOps
    from dask_amlcompute.cli.manage import DEFAULT_ENVIRONMENT_NAME

    spec = build_spec()
    entity = spec.to_environment(name=DEFAULT_ENVIRONMENT_NAME)
    name = asyncio.run(AmlOps(live_ml_client).register_environment(entity))
    assert name == f"{DEFAULT_ENVIRONMENT_NAME}:{spec.content_hash}"
    registered = live_ml_client.environments.get(DEFAULT_ENVIRONMENT_NAME, spec.content_hash)
    assert registered.conda_file["dependencies"][-1]["pip"] == list(spec.pip)


def test_live_job_ssh_service_carries_the_client_and_the_dashboard(live_ml_client, live_kwargs):
    """connect="job-ssh": AML's job SSH service through its WebSocket proxy, on any workspace.

    Checks on real AML what the emulator copies from public sources: the SshJobService on
    the main job, the service instance's ProxyEndpoint (wss://...nodes.azureml.ms), the
    bearer token with the management.core.windows.net scope, login as azureuser, and
    that the default environment's image has openssh-server.
    """
    import urllib.request

    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    with (
        AmlComputeCluster(live_ml_client, n_nodes=2, connect="job-ssh", **live_kwargs) as c,
        Client(c) as client,
    ):
        assert c._connector.mode == "job-ssh"
        assert c._connector.tunnel.ssh_host.endswith(".nodes.azureml.ms")
        assert client.submit(lambda x: x + 1, 41).result() == 42
        link = c.dashboard_link.replace("/status", "/health")
        assert urllib.request.urlopen(link, timeout=30).read() == b"ok"


def test_live_auto_names_the_path_it_took(live_ml_client, live_kwargs):
    """connect="auto" (the default) connects by one of its paths; which one depends on where
    this test runs (a compute instance in the VNet: direct; elsewhere: job-ssh)."""
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    with AmlComputeCluster(live_ml_client, n_nodes=1, **live_kwargs) as c, Client(c) as client:
        assert c._connector.mode in ("direct", "job-ssh", "ssh")
        assert client.submit(lambda: "ok").result() == "ok"


def test_live_sizes_quota_and_price_are_read(live_ml_client):
    """list_sizes / list_usage as azure-ai-ml returns them on real AML parse into size and quota."""
    import asyncio

    from dask_amlcompute.backend.capacity import find_size, quotas_for, size_from_sdk
    from dask_amlcompute.backend.ops import AmlOps

    ops = AmlOps(live_ml_client)
    compute = asyncio.run(ops.get_compute(os.environ["AZUREML_COMPUTE"]))
    sizes = [size_from_sdk(s) for s in asyncio.run(ops.list_sizes())]
    size = find_size(sizes, compute.vm_size)
    assert size is not None and size.vcpus > 0 and size.family
    lines = quotas_for(asyncio.run(ops.list_usage()), size.family, compute.tier)
    assert lines and all(q.limit is not None and q.limit >= 0 for q in lines)
    # prices are optional on AML: when present, the compute's tier has one
    if size.prices:
        assert size.hourly_price(compute.tier) is not None


def test_live_compute_is_created_and_deleted(live_ml_client, live_kwargs):
    """create_compute / delete_compute_on_close against AML's real long-running operations."""
    import uuid

    from dask_amlcompute import AmlComputeCluster

    name = f"dask-t-{uuid.uuid4().hex[:6]}"
    kwargs = {**live_kwargs, "compute": name}
    size = os.environ.get("AZUREML_CREATE_SIZE", "Standard_DS3_v2")
    with AmlComputeCluster(
        live_ml_client,
        n_nodes=1,
        create_compute={"size": size, "max_nodes": 1, "idle_time_before_scale_down": 60},
        delete_compute_on_close=True,
        **kwargs,
    ) as cluster:
        assert live_ml_client.compute.get(name).max_instances == 1
    assert name not in {c.name for c in live_ml_client.compute.list()}
    assert "Deleted AmlCompute" in "\n".join(line for _, line in cluster._cluster_manager_logs)


def _live_compute_size(live_ml_client) -> str:
    """The VM size of AZUREML_COMPUTE: one the subscription has quota for in this region."""
    import asyncio

    from dask_amlcompute.backend.ops import AmlOps

    compute = asyncio.run(AmlOps(live_ml_client).get_compute(os.environ["AZUREML_COMPUTE"]))
    assert compute.vm_size
    return compute.vm_size


def test_live_serverless_cluster(live_ml_client, live_kwargs):
    """Serverless: no compute; the job's resources and queue settings as AML accepts them."""
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    kwargs = {k: v for k, v in live_kwargs.items() if k != "compute"}
    size = os.environ.get("AZUREML_SERVERLESS_SIZE") or _live_compute_size(live_ml_client)
    with (
        AmlComputeCluster(live_ml_client, instance_type=size, n_nodes=2, **kwargs) as cluster,
        Client(cluster) as client,
    ):
        assert sum(client.gather(client.map(lambda x: x + 1, range(100)))) == 5050


def test_live_worker_jobs_on_a_low_priority_compute(live_ml_client, live_kwargs):
    """Worker jobs on a low-priority compute this test creates (0 nodes at rest) and deletes."""
    import uuid

    from azure.ai.ml.entities import AmlCompute
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    lowpri = f"dask-lp-{uuid.uuid4().hex[:6]}"
    live_ml_client.compute.begin_create_or_update(
        AmlCompute(
            name=lowpri,
            size=_live_compute_size(live_ml_client),
            tier="low_priority",
            max_instances=1,
            idle_time_before_scale_down=60,
        )
    ).result()
    try:
        with (
            AmlComputeCluster(
                live_ml_client, n_nodes=1, worker_compute=lowpri, **live_kwargs
            ) as cluster,
            Client(cluster) as client,
        ):
            cluster.scale(nodes=2)
            client.wait_for_workers(2, timeout=1800)
            workers = [j for j in cluster.jobs if j != cluster.main_job_name]
            assert live_ml_client.jobs.get(workers[0]).compute.rstrip("/").endswith(lowpri)
    finally:
        live_ml_client.compute.begin_delete(lowpri).result()


def test_live_gpu_environment_builds_on_aml(live_ml_client):
    """The GPU default environment (CUDA 12 image, the pinned dask-cuda) builds on AML.

    Only real AML settles this: the image is AML's, the build is AML's. The build needs no
    GPU, so a one-node command job on AZUREML_COMPUTE runs in it and reads the installed
    dask-cuda's version. A client whose dask no dask-cuda release admits is refused before
    anything is registered (what the library does for it too).
    """
    import asyncio
    import importlib.metadata

    from azure.ai.ml import command

    from dask_amlcompute import ConfigurationError
    from dask_amlcompute.backend.daskcuda import dask_cuda_requirement
    from dask_amlcompute.backend.environment import build_spec, local_python
    from dask_amlcompute.backend.ops import AmlOps

    dask_version = importlib.metadata.version("dask")
    try:
        requirement = dask_cuda_requirement(dask_version, local_python())
    except ConfigurationError:
        with pytest.raises(ConfigurationError, match="gpu_workers"):
            build_spec(gpu=True)
        return
    spec = build_spec(gpu=True)
    assert requirement in spec.pip
    env_name = asyncio.run(
        AmlOps(live_ml_client).register_environment(spec.to_environment("dask-amlcompute-gpu"))
    )
    wanted = requirement.split("==")[1]
    job = command(
        command=(
            'python -c "import importlib.metadata as m, sys; '
            f"sys.exit(m.version('dask-cuda') != '{wanted}')\""
        ),
        environment=env_name,
        compute=os.environ["AZUREML_COMPUTE"],
        experiment_name="dask-amlcompute-live-tests",
        timeout=3600,
    )
    submitted = live_ml_client.jobs.create_or_update(job)
    try:
        live_ml_client.jobs.stream(submitted.name)  # returns when the job ends (build included)
        assert live_ml_client.jobs.get(submitted.name).status == "Completed"
    finally:
        if live_ml_client.jobs.get(submitted.name).status not in (
            "Completed",
            "Failed",
            "Canceled",
        ):
            live_ml_client.jobs.begin_cancel(submitted.name)


def test_live_job_ssh_through_an_https_proxy(live_ml_client, live_kwargs, tmp_path, monkeypatch):
    """A corporate proxy: with HTTPS_PROXY set, the SDK's calls and the job SSH tunnel's
    WebSocket both go through it (HTTP CONNECT), as they must on a laptop behind one.

    Only real AML settles that its wss:// proxy endpoint takes a CONNECT-tunnelled client.
    The proxy is proxy.py on this machine's loopback (tests/emulated/test_job_ssh_proxy.py).
    """
    from _helpers import clear_proxy_env, http_proxy, wait_for
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    clear_proxy_env(monkeypatch)
    with http_proxy(tmp_path) as (url, log):
        monkeypatch.setenv("HTTPS_PROXY", url)
        with (
            AmlComputeCluster(live_ml_client, n_nodes=1, connect="job-ssh", **live_kwargs) as c,
            Client(c) as client,
        ):
            assert client.submit(lambda x: x + 1, 41).result() == 42
            endpoint = c._connector.tunnel.ssh_host
        # proxy.py logs each tunnelled connection when it closes
        wait_for(lambda: f"CONNECT {endpoint}:443" in log.read_text(), 30, "the CONNECT")


def test_live_single_node_publishes_an_address_others_reach(live_ml_client, live_kwargs):
    """A one-node job: AML may leave MASTER_ADDR unset; the node must still publish its own
    reachable address, never loopback (issue 25). Records what AML set, for the docs."""
    import ipaddress
    import os as node_os
    from urllib.parse import urlparse

    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    with AmlComputeCluster(live_ml_client, n_nodes=1, **live_kwargs) as c, Client(c) as client:
        published = urlparse(client.scheduler_info()["address"]).hostname
        master = client.run_on_scheduler(lambda: node_os.environ.get("MASTER_ADDR"))
    print(f"one-node job: MASTER_ADDR={master!r}, scheduler published {published}")
    assert not ipaddress.ip_address(published).is_loopback
