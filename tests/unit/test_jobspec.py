"""The AML job a cluster submits, built without a network."""

from __future__ import annotations

import json
import shlex

import pytest

from dask_amlcompute._protocol import (
    SETTINGS_TAG,
    NodeOptions,
    ScriptOptions,
    node_command,
    read_settings_tag,
)
from dask_amlcompute.backend.environment import environment_from_settings
from dask_amlcompute.backend.jobspec import build_job
from dask_amlcompute.config import resolve_settings


def rest(job):
    return job._to_job()._to_rest_object().as_dict()["properties"]


def test_cluster_job_body_has_the_documented_shape():
    node = NodeOptions(role="cluster", name_prefix="c1-main", processes=2, threads=3)
    settings = resolve_settings(compute="cpu-cluster", name="c1", experiment_name="exp",
                                tags={"team": "x"})  # fmt: skip
    job = build_job(
        settings,
        name="c1-main",
        n_nodes=3,
        node=node,
        environment="my-env@latest",
        timeout_seconds=5400,
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
    assert NodeOptions.from_argv(argv[3:]) == node


def test_mpi_distribution():
    node = NodeOptions(role="cluster", name_prefix="p")
    settings = resolve_settings(compute="c", name="p", distribution="mpi")
    job = build_job(settings, name="j", n_nodes=2, node=node, environment="e:1",
                    timeout_seconds=None)  # fmt: skip
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
    argv = shlex.split(node_command(node))
    assert argv[:3] == ["python", "-m", "dask_amlcompute.node"]
    back = NodeOptions.from_argv(argv[3:])
    assert back == node
    assert back.worker_options == {"resources": {"GPU": 1}, "name with space": "it's"}


@pytest.mark.parametrize(
    "node",
    [
        NodeOptions(role="cluster", name_prefix="c-main"),
        NodeOptions(
            role="cluster", name_prefix="c-main", processes=3, threads=2, memory_limit="4GiB",
            scheduler_port=9000, dashboard_port=0, death_timeout=1234567.0, idle_timeout=7200,
            no_client_timeout=600, first_contact_timeout=1200.5,
        ),
        NodeOptions(role="cluster", name_prefix="p", memory_limit=0.5),
        NodeOptions(role="cluster", name_prefix="p", memory_limit=4_000_000_000),
        NodeOptions(role="workers", name_prefix="c-w1", scheduler_address="tls://10.0.0.4:8786"),
    ],
)  # fmt: skip
def test_node_options_roundtrip_through_the_command_line(node):
    argv = shlex.split(node_command(node))
    assert argv[:3] == ["python", "-m", "dask_amlcompute.node"]
    assert NodeOptions.from_argv(argv[3:]) == node


def test_script_options_roundtrip_and_pick_the_script_entrypoint():
    node = NodeOptions(
        role="cluster",
        name_prefix="run-1",
        processes=2,
        no_client_timeout=60,
        first_contact_timeout=360,
        script=ScriptOptions(
            script="src/job.py", wait_workers=45.5,
            args=("--alpha", "1 2", "--", "--processes", ""),
        ),
    )  # fmt: skip
    argv = shlex.split(node_command(node))
    assert argv[:3] == ["python", "-m", "dask_amlcompute.node.script"]
    assert NodeOptions.from_argv(argv[3:], script=True) == node
    embedded = NodeOptions(role="cluster", name_prefix="run-2", script=ScriptOptions())
    assert NodeOptions.from_argv(embedded.to_argv(), script=True) == embedded
    with pytest.raises(SystemExit):  # the cluster entrypoint refuses job mode's options
        NodeOptions.from_argv(node.to_argv())


def test_main_job_stores_its_settings_in_one_tag():
    node = NodeOptions(
        role="cluster", name_prefix="c1-main", processes=2, threads=3, memory_limit="6GiB",
        worker_on_scheduler=False, scheduler_port=9786, dashboard_port=9787, death_timeout=120,
        no_client_timeout=900, worker_options={"resources": {"GPU": 1}},
    )  # fmt: skip
    settings = resolve_settings(compute="cpu", name="c1", distribution="mpi", nodes_per_job=2)
    job = build_job(settings, name="c1-main", n_nodes=2, node=node, environment="e:1",
                    timeout_seconds=None)  # fmt: skip
    tags = rest(job)["tags"]
    assert json.loads(tags[SETTINGS_TAG]) == read_settings_tag(tags)
    assert read_settings_tag(tags) == {
        "processes_per_node": 2,
        "threads_per_process": 3,
        "memory_limit": "6GiB",
        "worker_on_scheduler": False,
        "scheduler_port": 9786,
        "dashboard_port": 9787,
        "death_timeout": 120,
        "no_client_timeout": 900,
        "distribution": "mpi",
        "worker_options": {"resources": {"GPU": 1}},
        "nodes_per_job": 2,
    }
    workers = NodeOptions(role="workers", name_prefix="c1-w1", scheduler_address="tcp://a:1")
    job = build_job(settings, name="c1-w1", n_nodes=1, node=workers, environment="e:1",
                    timeout_seconds=None)  # fmt: skip
    assert SETTINGS_TAG not in rest(job)["tags"]
    for bad in ({SETTINGS_TAG: "not json"}, {SETTINGS_TAG: "[]"}, {}):
        with pytest.raises(ValueError):
            read_settings_tag(bad)


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

    env = environment_from_settings(resolve_settings(compute="c"))
    pip = env.conda_file["dependencies"][-1]["pip"]
    assert f"dask=={dask.__version__}" in pip
    assert f"distributed=={distributed.__version__}" in pip
    assert env.image and env.conda_file
    again = environment_from_settings(resolve_settings(compute="c"))
    assert again.conda_file == env.conda_file  # same spec, same AML hash


def test_not_responding_and_paused_jobs_are_not_ended():
    # They still hold nodes: close must cancel them, discovery must list them.
    from dask_amlcompute.backend.ops import JobInfo

    assert not JobInfo("j", "NotResponding").terminal
    assert not JobInfo("j", "Paused").terminal
    assert JobInfo("j", "Canceled").terminal
