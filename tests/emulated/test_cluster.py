"""AmlComputeCluster end to end on the emulator: real SDK, real processes, real Dask."""

from __future__ import annotations

import logging
import operator
import time

import dask
import dask.bag as db
import pytest
from distributed import Client

from dask_amlcompute import (
    AmlComputeCluster,
    ComputeNotFoundError,
    ConfigurationError,
    JobFailedError,
    NotAmlComputeError,
    TooManyNodesError,
)
from dask_amlcompute.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_three_node_cluster_runs_dask_workloads(emulator, ml_client, cluster_kwargs, capsys):
    import dask.dataframe as dd
    import pandas as pd  # the test extra installs it: a missing one must fail

    with (
        AmlComputeCluster(ml_client, n_nodes=3, **cluster_kwargs) as cluster,
        Client(cluster) as client,
    ):
        job = cluster.main_job_name
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 3
        names = sorted(w["name"] for w in workers.values())
        assert names == [f"{cluster.name}-main-{r}-0" for r in range(3)]
        # rank 0's worker is on its node's address (MASTER_ADDR); the other nodes find theirs
        # as on AML, by the route to the master (AZ_BATCHAI_NODE_IP is not documented), which
        # on the emulator's shared loopback is 127.0.0.1 (per-node namespaces: issue #16)
        hosts = {w["host"] for w in workers.values()}
        assert emulator.job_nodes(job)[0]["ip"] in hosts
        assert emulator.job_status(job) == "Running"
        assert emulator.nodes_in_use("cpu-cluster") >= 3

        assert (
            dask.delayed(sum)([dask.delayed(operator.mul)(i, 2) for i in range(10)]).compute() == 90
        )
        assert (
            db.from_sequence(range(100), npartitions=5).map(lambda x: x + 1).sum().compute() == 5050
        )
        df = pd.DataFrame({"k": [i % 3 for i in range(300)], "v": range(300)})
        got = dd.from_pandas(df, npartitions=6).groupby("k").v.sum().compute().sort_index()
        assert got.tolist() == df.groupby("k").v.sum().sort_index().tolist()
        futures = client.map(operator.pow, range(200), [2] * 200)
        assert sum(client.gather(futures)) == sum(i * i for i in range(200))

        assert cluster.jobs[job] == "Running"
        assert job in cluster._repr_html_()
        assert cluster.dashboard_link.startswith("http://")
        # the price (size list of the unmodified SDK) in the repr, the log and `list`
        price = "$0.29/h per node, $0.87/h for 3 node(s) (estimate)"
        assert f"price={price!r}" in repr(cluster)
        assert price in cluster._repr_html_()
        logs = "\n".join(cluster.get_logs(scheduler=False, workers=False).values())
        assert f"Compute cpu-cluster: 3 x Standard_DS3_v2 (4 vCPUs, dedicated): {price}" in logs
        capsys.readouterr()
        assert cli_main(["list", "--emulator", emulator.base_url]) == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if line.startswith(cluster.name))
        assert "$0.87" in row  # 3 nodes at $0.29/h
    final = emulator.wait_job(job, timeout=30)
    assert final in ("Completed", "Canceled")
    assert job not in emulator.active_jobs()


def test_scheduler_address_found_in_run_history_when_the_job_lacks_it(
    run_tags_withheld, ml_client, cluster_kwargs, caplog
):
    """The address from run history, a no-client clock that waits for it, the MLflow fallback.

    With run tags kept off the job resource, the client reads the address from run history
    only after the job has run RUN_HISTORY_FALLBACK_AFTER (10 s): far longer than
    no_client_timeout=2. Counting from scheduler start, the scheduler would be gone by then
    (the flake seen on busy machines, where publishing the address took longer than a short
    no_client_timeout): its clock must wait for the first contact.
    """
    import asyncio

    from dask_amlcompute._protocol import SCHEDULER_TAG
    from dask_amlcompute.backend.ops import AmlOps

    # azureml:// with a credential that is not DefaultAzureCredential: azureml-mlflow would
    # log in on its own (interactively outside a job), so the route is not even tried
    azureml = "azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/s/resourceGroups/g"
    kwargs = {**cluster_kwargs, "no_client_timeout": 2}
    with (
        caplog.at_level(logging.INFO, logger="dask_amlcompute"),
        AmlComputeCluster(ml_client, n_nodes=1, **kwargs) as cluster,
        Client(cluster) as c,
    ):
        assert cluster.startup_phases["scheduler address"] >= 10
        job = cluster.main_job_name
        assert SCHEDULER_TAG not in (ml_client.jobs.get(job).tags or {})  # only run history has it
        run = ml_client.jobs._runs_operations.get_run(job)
        assert cluster.scheduler_address.endswith(run.tags[SCHEDULER_TAG].rsplit(":", 1)[1])
        assert c.submit(operator.add, 1, 2).result() == 3
        # read through the documented route (mlflow + the workspace's tracking URI), no fallback
        assert "falling back" not in caplog.text, caplog.text
        # A client whose MLflow route fails (here: a tracking URI scheme mlflow has no store
        # for, as azureml:// is without the azureml-mlflow plugin) still gets the tags through
        # run history, and is told once, at INFO (nothing is wrong for the user).
        for uri in ("azureml-unknown://nowhere/mlflow", azureml):
            ops = AmlOps(ml_client, tracking_uri=uri)
            tags = asyncio.run(ops.run_tags(job))
            asyncio.run(ops.run_tags(job))
            assert SCHEDULER_TAG in tags
    fallbacks = [r for r in caplog.records if "falling back to run history" in r.getMessage()]
    assert len(fallbacks) == 2 and {r.levelno for r in fallbacks} == {logging.INFO}
    assert "would log in on its own" in fallbacks[1].getMessage()


def test_processes_per_node_and_mpi_distribution(emulator, ml_client, cluster_kwargs):
    with (
        AmlComputeCluster(
            ml_client, n_nodes=2, processes_per_node=2, distribution="mpi", **cluster_kwargs
        ) as cluster,
        Client(cluster) as client,
    ):
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 4
        assert sorted(w["name"] for w in workers.values()) == sorted(
            f"{cluster.name}-main-{r}-{i}" for r in range(2) for i in range(2)
        )
        assert client.submit(lambda: 41 + 1).result() == 42
        body = cluster.job_spec()["properties"]
        assert body["distribution"]["distributionType"] == "Mpi"
    assert emulator.wait_job(cluster.main_job_name, timeout=30) in ("Completed", "Canceled")


def test_async_cluster(emulator, ml_client, cluster_kwargs):
    import asyncio

    async def main():
        async with AmlComputeCluster(
            ml_client, n_nodes=2, asynchronous=True, **cluster_kwargs
        ) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                assert await client.submit(sum, [1, 2, 3]) == 6
            return cluster.main_job_name

    job = asyncio.run(main())
    assert emulator.wait_job(job, timeout=30) in ("Completed", "Canceled")


def test_wrong_compute_name_lists_the_computes(ml_client, cluster_kwargs):
    cluster_kwargs["compute"] = "no-such-compute"
    with pytest.raises(ComputeNotFoundError, match="cpu-cluster") as info:
        AmlComputeCluster(ml_client, n_nodes=2, **cluster_kwargs)
    assert "no-such-compute" in str(info.value)


def test_non_amlcompute_target_is_refused(ml_client, cluster_kwargs):
    cluster_kwargs["compute"] = "notebook-ci"
    with pytest.raises(NotAmlComputeError, match="not an AmlCompute"):
        AmlComputeCluster(ml_client, n_nodes=2, **cluster_kwargs)


def test_more_nodes_than_the_compute_max_fails_before_submission(
    emulator, ml_client, cluster_kwargs
):
    before = set(emulator.active_jobs())
    cluster_kwargs["compute"] = "tiny"
    with pytest.raises(TooManyNodesError, match="at most 2"):
        AmlComputeCluster(ml_client, n_nodes=3, name="too-many-nodes", **cluster_kwargs)
    assert set(emulator.active_jobs()) <= before  # nothing new (a closed one may end meanwhile)
    with pytest.raises(Exception):  # noqa: B017  the job was never created
        ml_client.jobs.get("too-many-nodes-main")


def test_bad_timeout_fails_before_anything(ml_client, cluster_kwargs):
    cluster_kwargs["job_timeout"] = "until lunch"
    with pytest.raises(ConfigurationError, match="job_timeout"):
        AmlComputeCluster(ml_client, n_nodes=2, **cluster_kwargs)


def test_node_that_crashes_at_start_gives_log_tail_and_leaves_nothing(
    emulator, ml_client, cluster_kwargs
):
    # An invalid worker option makes every worker node fail at start.
    with pytest.raises(JobFailedError) as info:
        AmlComputeCluster(
            ml_client,
            n_nodes=2,
            worker_options={"no_such_option": 1},
            name="crash-at-start",
            **cluster_kwargs,
        )
    err = info.value
    assert err.job_name == "crash-at-start-main"
    assert err.status == "Failed"
    assert "no_such_option" in str(err)
    assert err.log_tail
    assert emulator.wait_job("crash-at-start-main", timeout=30) in ("Failed", "Canceled")
    assert not [n for n in emulator.job_nodes("crash-at-start-main") if n.get("state") == "running"]


def test_job_timeout_ends_the_cluster_with_a_clear_reason(emulator, ml_client, cluster_kwargs):
    cluster_kwargs["job_timeout"] = "8s"
    with AmlComputeCluster(ml_client, n_nodes=2, **cluster_kwargs) as cluster:
        job = cluster.main_job_name
        emulator.wait_job(job, timeout=40)
        deadline = time.monotonic() + 20
        while cluster.ended_reason is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.ended_reason is not None
        assert (
            "timeout" in cluster.ended_reason.lower()
            or "time limit" in cluster.ended_reason.lower()
        )
    assert emulator.job_status(job) in ("Failed", "Canceled")
