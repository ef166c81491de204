"""The AML job a cluster submits, built without a network."""

from __future__ import annotations

import shlex

from dask_amlcompute._protocol import NodeOptions, node_command
from dask_amlcompute.backend.environment import conda_spec, resolve_environment
from dask_amlcompute.backend.jobspec import build_job
from dask_amlcompute.node.entry import _parse_args


def rest(job):
    return job._to_job()._to_rest_object().as_dict()["properties"]


def test_cluster_job_body_has_the_documented_shape():
    node = NodeOptions(role="cluster", name_prefix="c1-main", processes=2, threads=3)
    job = build_job(
        name="c1-main",
        compute="cpu-cluster",
        n_nodes=3,
        node=node,
        environment=resolve_environment("my-env@latest"),
        experiment_name="exp",
        timeout_seconds=5400,
        cluster_name="c1",
        tags={"team": "x"},
        env_vars={"FOO": "1"},
    )
    body = rest(job)
    assert body["jobType"] == "Command"
    assert body["computeId"] == "cpu-cluster"
    assert body["resources"]["instanceCount"] == 3
    assert body["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 1}
    assert body["limits"]["timeout"] == "PT1H30M"
    assert body["experimentName"] == "exp"
    assert body["environmentId"] == "my-env@latest"
    assert body["environmentVariables"] == {"FOO": "1"}
    assert body["tags"]["dask_cluster"] == "c1"
    assert body["tags"]["dask_role"] == "cluster"
    assert body["tags"]["team"] == "x"
    argv = shlex.split(body["command"])
    assert argv[:3] == ["python", "-m", "dask_amlcompute.node"]
    args = _parse_args(argv[3:])
    assert (args.role, args.name_prefix, args.processes, args.threads) == (
        "cluster",
        "c1-main",
        2,
        3,
    )


def test_mpi_distribution():
    node = NodeOptions(role="cluster", name_prefix="p")
    job = build_job(
        name="j", compute="c", n_nodes=2, node=node, environment="e:1",
        experiment_name="x", timeout_seconds=None, cluster_name="p", distribution="mpi",
    )  # fmt: skip
    assert rest(job)["distribution"]["distributionType"] == "Mpi"


def test_node_command_roundtrips_options_with_awkward_json():
    node = NodeOptions(
        role="workers",
        name_prefix="w",
        scheduler_address="tcp://127.0.3.1:8786",
        worker_options={"resources": {"GPU": 1}, "name with space": "it's"},
        scheduler_options={"idle_timeout": "1h"},
        worker_on_scheduler=False,
        idle_timeout=60,
    )
    args = _parse_args(shlex.split(node_command(node))[3:])
    assert args.role == "workers"
    assert args.scheduler_address == "tcp://127.0.3.1:8786"
    assert args.worker_options == {"resources": {"GPU": 1}, "name with space": "it's"}
    assert args.scheduler_options == {"idle_timeout": "1h"}
    assert args.worker_on_scheduler is False
    assert args.idle_timeout == 60


def test_worker_suffixes_group_workers_by_rank_and_process():
    node = NodeOptions(role="cluster", name_prefix="p", processes=2)
    assert node.worker_suffixes(2) == ["-0-0", "-0-1", "-1-0", "-1-1"]
    node = NodeOptions(role="cluster", name_prefix="p", worker_on_scheduler=False)
    assert node.worker_suffixes(3) == ["-1-0", "-2-0"]
    node = NodeOptions(role="workers", name_prefix="p", worker_on_scheduler=False)
    assert node.worker_suffixes(2) == ["-0-0", "-1-0"]


def test_default_environment_pins_client_versions():
    import dask
    import distributed

    env = resolve_environment(None)
    pip = conda_spec()["dependencies"][-1]["pip"]
    assert f"dask=={dask.__version__}" in pip
    assert f"distributed=={distributed.__version__}" in pip
    assert env.image and env.conda_file
    assert resolve_environment(None).conda_file == env.conda_file  # same spec, same AML hash
    assert (
        resolve_environment("myregistry.azurecr.io/dask:1").image == "myregistry.azurecr.io/dask:1"
    )
