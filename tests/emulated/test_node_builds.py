"""Nodes that really build: on the strict emulator the default cluster's environment is built
from the package index, the library arrives only through the code snapshot, a requirement no
index has fails with a typed error, and Preparing has its own bound."""

from __future__ import annotations

import logging
import sys
import time

import dask.bag as db
import pytest
from _helpers import wait_for
from distributed import Client

from dask_amlcompute import AmlComputeCluster, EnvironmentBuildError, StartupTimeoutError
from dask_amlcompute.backend.environment import build_spec
from dask_amlcompute.backend.snapshot import LIBRARY_DIR
from dask_amlcompute.cli import main as cli_main

NO_SUCH_REQUIREMENT = "dask-amlcompute-no-such-package-xyz==0.0.1"


@pytest.mark.slow
def test_default_cluster_builds_and_runs_the_library_from_the_snapshot(
    emulator, ml_client, cluster_kwargs
):
    def node_facts() -> dict:  # nested: pickled by value (this test module is not on the nodes)
        import importlib.util
        import os
        import sys

        import dask_amlcompute

        try:
            import azure.ai.ml  # noqa: F401

            azure_ai_ml = True
        except ImportError:
            azure_ai_ml = False
        return {
            "library": dask_amlcompute.__file__,
            "prefix": sys.prefix,
            "path": list(sys.path),
            "azure_ai_ml": azure_ai_ml,
            "pytest": importlib.util.find_spec("pytest") is not None,
            "node_ip_variable": os.environ.get("AZ_BATCHAI_NODE_IP"),
        }

    with (
        AmlComputeCluster(ml_client, n_nodes=2, **cluster_kwargs) as cluster,
        Client(cluster) as client,
    ):
        bag = db.from_sequence(range(1000), npartitions=8)
        assert bag.map(lambda x: x * x).sum().compute() == sum(x * x for x in range(1000))
        facts = client.run(node_facts)
        nodes = emulator.job_nodes(cluster.main_job_name)
        workdirs = [n["workdir"] for n in nodes]
    assert len(facts) == 2
    client_site = [p for p in sys.path if "site-packages" in p]
    for fact in facts.values():
        # the library came with the job's code snapshot, in a node's working directory
        assert any(fact["library"].startswith(wd) for wd in workdirs), fact["library"]
        assert not fact["library"].startswith(str(LIBRARY_DIR))
        # the node runs in the built environment: none of the client's packages
        assert fact["prefix"] != sys.prefix
        assert not set(fact["path"]) & set(client_site)
        assert not fact["azure_ai_ml"] and not fact["pytest"]
        # AML does not document AZ_BATCHAI_NODE_IP: the nodes found their address without it
        assert fact["node_ip_variable"] is None
    log = emulator.node_log(cluster.main_job_name, 0)
    assert "[emulator]" in log and "build" in log


@pytest.mark.slow
def test_a_requirement_no_index_has_fails_with_a_typed_error(emulator, ml_client, cluster_kwargs):
    with pytest.raises(EnvironmentBuildError) as info:
        AmlComputeCluster(
            ml_client, n_nodes=1, pip_packages=[NO_SUCH_REQUIREMENT], **cluster_kwargs
        )
    error = info.value
    assert error.requirements and error.requirements[0].startswith(
        NO_SUCH_REQUIREMENT.split("=")[0]
    )
    assert NO_SUCH_REQUIREMENT.split("=")[0] in str(error)
    assert "Image build failed" in str(error) and error.status == "Failed"
    assert error.log_tail  # the build log's tail
    assert error.job_name not in emulator.active_jobs()


@pytest.mark.slow
def test_preparing_has_its_own_bound(emulator, ml_client, cluster_kwargs):
    emulator.provisioning_delay = 8.0
    try:
        # startup_timeout shorter than the time in Preparing: Preparing is not counted
        with AmlComputeCluster(
            ml_client, n_nodes=1, **{**cluster_kwargs, "startup_timeout": "6s"}
        ) as cluster:
            assert cluster.startup_phases["Running"] >= 8.0
        # ... and prepare_timeout bounds it
        with pytest.raises(StartupTimeoutError, match="prepare_timeout") as info:
            AmlComputeCluster(ml_client, n_nodes=1, prepare_timeout="2s", **cluster_kwargs)
        assert info.value.job_name not in emulator.active_jobs()
    finally:
        emulator.provisioning_delay = 0.0


@pytest.mark.slow
def test_env_build_registers_the_environment_clusters_then_name(
    emulator, ml_client, cluster_kwargs, capsys, caplog
):
    assert cli_main(["env", "build", "--emulator", emulator.base_url, "--stack", "none"]) == 0
    spec = build_spec(stack="none")
    name = f"dask-amlcompute-node:{spec.content_hash}"
    assert name in capsys.readouterr().out
    registered = ml_client.environments.get("dask-amlcompute-node", spec.content_hash)
    assert registered.conda_file["dependencies"][-1]["pip"] == list(spec.pip)
    # registering the same content again is the same version
    assert cli_main(["env", "build", "--emulator", emulator.base_url, "--stack", "none"]) == 0
    with (
        AmlComputeCluster(ml_client, n_nodes=1, environment=name, **cluster_kwargs) as cluster,
        Client(cluster) as client,
    ):
        assert client.submit(lambda x: x + 1, 1).result() == 2
        # stack="none" nodes lack scikit-learn and nbformat, which this client has: a task
        # importing one errs, a graph holding a function of the other cannot be unpickled
        # on the scheduler. However often that happens, the library names each in one line.
        import nbformat

        def uses_sklearn(x):  # nested: pickled by value, imports sklearn on the node
            import sklearn  # noqa: F401

            return x

        with caplog.at_level(logging.WARNING, logger="dask_amlcompute"):
            for attempt in range(2):
                with pytest.raises(ModuleNotFoundError, match="sklearn"):
                    client.submit(uses_sklearn, attempt).result(timeout=30)
                with pytest.raises(RuntimeError, match="deserialization of the task graph"):
                    client.submit(nbformat.reads, "{}", attempt).result(timeout=30)

            def hints() -> list[str]:
                return [r.getMessage() for r in caplog.records if "no module" in r.getMessage()]

            wait_for(lambda: len(hints()) >= 2, 20, "the missing-module hints")
            time.sleep(3 * cluster_kwargs["watch_interval"])  # heartbeats that must not repeat them
    assert len(hints()) == 2, hints()
    sklearn, nbformat_hint = sorted(hints(), key=lambda h: "nbformat" in h)
    assert "'sklearn'" in sklearn and "pip_packages=['scikit-learn==" in sklearn
    assert "'nbformat'" in nbformat_hint and "pip_packages=['nbformat==" in nbformat_hint
