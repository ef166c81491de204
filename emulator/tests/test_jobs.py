"""Jobs on the emulator through the real azure-ai-ml SDK: env vars, outcomes, queueing."""

from __future__ import annotations

import json
import os
import sys
import time

import psutil
import pytest
from _emu_helpers import PRINT_ENV, node_env, submit, wait_for, wait_log

from aml_emulator import identity


def _status(job) -> str:
    return getattr(job.status, "value", job.status)


@pytest.mark.slow
def test_pytorch_job_env_per_node(emu, ml):
    job = submit(
        ml,
        PRINT_ENV,
        nodes=3,
        distribution={"type": "pytorch"},
        env={"MY_VAR": "hello"},
        tags={"team": "dask"},
    )
    assert emu.wait_job(job.name, 30) == "Completed"
    nodes = emu.job_nodes(job.name)
    assert [n["rank"] for n in nodes] == [0, 1, 2]
    ips = [n["ip"] for n in nodes]
    assert len(set(ips)) == 3 and all(ip.startswith("127.") for ip in ips)
    for rank in range(3):
        out = node_env(emu, job.name, rank)
        env = out["env"]
        assert out["exe"] == sys.executable or os.path.samefile(out["exe"], sys.executable)
        assert env["MASTER_ADDR"] == ips[0]
        assert env["MASTER_PORT"] == "6105"
        assert env["WORLD_SIZE"] == "3"
        assert env["NODE_RANK"] == env["RANK"] == str(rank)
        assert env["LOCAL_RANK"] == "0"
        assert "AZ_BATCHAI_NODE_IP" not in env  # AML does not document it
        assert env["AZUREML_RUN_ID"] == job.name
        assert env["AZUREML_NODE_COUNT"] == "3"
        assert env["AZUREML_ARM_SUBSCRIPTION"] == identity.SUBSCRIPTION_ID
        assert env["AZUREML_ARM_RESOURCEGROUP"] == identity.RESOURCE_GROUP
        assert env["AZUREML_ARM_WORKSPACE_NAME"] == identity.WORKSPACE_NAME
        assert env["MLFLOW_RUN_ID"] == job.name
        # AML's form: azureml:// with a token for the run (azureml-mlflow resolves it)
        assert env["MLFLOW_TRACKING_URI"] == emu.node_tracking_uri
        assert env["MLFLOW_TRACKING_URI"].startswith("azureml://127.0.0.1:")
        assert env["MLFLOW_TRACKING_TOKEN"].count(".") == 2  # a JWT
        assert env["MLFLOW_TRACKING_TOKEN"] not in json.dumps(ml.jobs.get(job.name)._to_dict())
        assert env["MLFLOW_EXPERIMENT_NAME"] == "emulator-tests"
        assert env["MY_VAR"] == "hello"
        assert "OMPI_COMM_WORLD_RANK" not in env
        assert n_cwd_ok(nodes[rank])
    got = ml.jobs.get(job.name)
    assert _status(got) == "Completed"
    assert got.tags["team"] == "dask"
    assert got.experiment_name == "emulator-tests"
    assert got.resources.instance_count == 3
    assert got.environment_variables["MY_VAR"] == "hello"
    assert got.environment == "dask-env:1"
    assert got.services["Studio"].endpoint.startswith(f"https://ml.azure.com/runs/{job.name}?wsid=")
    assert emu.nodes_in_use("cpu-cluster") == 0


def n_cwd_ok(node: dict) -> bool:
    return os.path.isdir(node["workdir"]) and node["log_path"].endswith(
        f"user_logs/std_log_process_{node['rank']}.txt"
    )


@pytest.mark.slow
def test_mpi_job_env_per_node(emu, ml):
    job = submit(
        ml, PRINT_ENV, nodes=2, distribution={"type": "mpi", "process_count_per_instance": 1}
    )
    assert emu.wait_job(job.name, 30) == "Completed"
    ips = [n["ip"] for n in emu.job_nodes(job.name)]
    for rank in range(2):
        env = node_env(emu, job.name, rank)["env"]
        assert env["OMPI_COMM_WORLD_RANK"] == str(rank)
        assert env["OMPI_COMM_WORLD_SIZE"] == "2"
        assert env["OMPI_COMM_WORLD_LOCAL_RANK"] == "0"
        assert env["AZ_BATCH_MASTER_NODE"] == f"{ips[0]}:6105"
        assert env["AZ_BATCHAI_MPI_MASTER_NODE"] == ips[0]
        assert "AZ_BATCHAI_NODE_IP" not in env  # AML does not document it
        assert "MASTER_ADDR" not in env and "RANK" not in env


def test_single_node_job_has_no_rank_vars(emu, ml):
    job = submit(ml, PRINT_ENV)
    assert emu.wait_job(job.name, 30) == "Completed"
    env = node_env(emu, job.name, 0)["env"]
    assert env["AZUREML_NODE_COUNT"] == "1"
    assert env["AZUREML_RUN_ID"] == job.name
    for var in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        assert var not in env


def test_inline_image_environment_job(emu, ml):
    from azure.ai.ml.entities import Environment

    job = submit(ml, "echo inline", environment=Environment(image="python:3.11-slim"))
    assert emu.wait_job(job.name, 30) == "Completed"
    got = ml.jobs.get(job.name)
    assert got.environment.startswith("CliV2AnonymousEnvironment:")
    name, version = got.environment.split(":")
    assert ml.environments.get(name, version=version).image == "python:3.11-slim"


def test_nonzero_exit_fails_with_node_and_stderr_tail(emu, ml):
    cmd = (
        "python -c \"import os, sys; r = int(os.environ['RANK']); print('rank', r); "
        "sys.stderr.write('boom on rank %d\\n' % r) if r == 1 else None; sys.exit(3 if r == 1 else 0)\""
    )
    job = submit(ml, cmd, nodes=2, distribution={"type": "pytorch"})
    assert emu.wait_job(job.name, 30) == "Failed"
    assert _status(ml.jobs.get(job.name)) == "Failed"
    error = emu.job_error(job.name)
    assert "rank 1" in error["message"]
    assert "status code 3" in error["message"]
    assert "boom on rank 1" in error["message"]
    assert "user_logs/std_log_process_1.txt" in error["message"]
    details = ml.jobs._runs_operations.get_run_details(job.name)
    assert details.status == "Failed"
    assert "boom on rank 1" in details.error.error.message
    assert set(details.log_files) == {
        "user_logs/std_log_process_0.txt",
        "user_logs/std_log_process_1.txt",
    }
    import requests

    text = requests.get(details.log_files["user_logs/std_log_process_1.txt"], timeout=10).text
    assert "rank 1" in text and "boom on rank 1" in text
    assert "boom on rank 1" in emu.node_log(job.name, 1)


def test_job_stream_prints_logs(emu, ml, capsys):
    job = submit(ml, "echo streamed-line-from-node")
    ml.jobs.stream(job.name)
    out = capsys.readouterr().out
    assert f"RunId: {job.name}" in out
    assert "streamed-line-from-node" in out


@pytest.mark.slow
def test_timeout_cancels_job_with_message(emu, ml):
    job = submit(ml, "echo started; sleep 60", timeout=1)
    assert ml.jobs.get(job.name).limits.timeout == 1
    assert emu.wait_job(job.name, 20) == "Canceled"
    error = emu.job_error(job.name)
    assert "timeout" in error["message"] and "PT1S" in error["message"]
    pid = emu.job_nodes(job.name)[0]["pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_cancel_kills_every_node_process(emu, ml):
    # Each node starts a background child too: the whole process group must go.
    job = submit(ml, "sleep 60 & echo ready; wait", nodes=2, distribution={"type": "pytorch"})
    for rank in range(2):
        wait_log(emu, job.name, rank, "ready")
    pids = [n["pid"] for n in emu.job_nodes(job.name)]
    children = [c.pid for p in pids for c in psutil.Process(p).children(recursive=True)]
    assert children
    ml.jobs.begin_cancel(job.name).result(timeout=30)
    assert emu.job_status(job.name) == "Canceled"
    assert _status(ml.jobs.get(job.name)) == "Canceled"
    wait_for(lambda: not any(_alive(p) for p in pids + children), 10, "node processes gone")
    assert emu.nodes_in_use("cpu-cluster") == 0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_queueing_when_max_nodes_reached(emu, ml):
    first = submit(
        ml, "echo ready; sleep 30", compute="small", nodes=2, distribution={"type": "pytorch"}
    )
    wait_log(emu, first.name, 0, "ready")
    second = submit(ml, "echo second", compute="small")
    assert emu.wait_job(second.name, 5, statuses=["Queued"]) == "Queued"
    assert _status(ml.jobs.get(second.name)) == "Queued"
    assert emu.nodes_in_use("small") == 2
    assert {first.name, second.name} <= set(emu.active_jobs())
    active = {j.name for j in ml.jobs.list()}
    assert {first.name, second.name} <= active
    ml.jobs.begin_cancel(first.name).result(timeout=30)
    assert emu.wait_job(second.name, 30) == "Completed"
    assert emu.nodes_in_use("small") == 0


def test_more_nodes_than_max_fails_instead_of_queueing(emu, ml):
    job = submit(ml, "echo never", compute="small", nodes=3, distribution={"type": "pytorch"})
    assert emu.wait_job(job.name, 10) == "Failed"
    assert "Requested 3 nodes" in emu.job_error(job.name)["message"]
    assert "2 maximum nodes" in emu.job_error(job.name)["message"]


def test_unknown_compute_rejected_at_submit(ml):
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError) as info:
        submit(ml, "echo x", compute="no-such-cluster")
    assert info.value.status_code == 400
    assert "no-such-cluster" in str(info.value)


@pytest.mark.slow
def test_fail_node_fails_job_naming_the_node(emu, ml):
    job = submit(ml, "echo ready; sleep 60", nodes=2, distribution={"type": "pytorch"})
    wait_log(emu, job.name, 1, "ready")
    emu.fail_node(job.name, 1)
    assert emu.wait_job(job.name, 20) == "Failed"
    message = emu.job_error(job.name)["message"]
    assert "rank 1" in message and "SIGKILL" in message
    wait_for(lambda: not any(_alive(n["pid"]) for n in emu.job_nodes(job.name)), 10, "nodes gone")


@pytest.mark.slow
def test_preempt_node_fails_job_as_preempted(emu, ml):
    job = submit(
        ml, "echo ready; sleep 60", compute="warm", nodes=2, distribution={"type": "pytorch"}
    )
    wait_log(emu, job.name, 0, "ready")
    emu.preempt_node(job.name, 0)
    assert emu.wait_job(job.name, 20) == "Failed"
    error = emu.job_error(job.name)
    assert error["code"] == "JobPreempted" and "PreemptionError" in error["message"]


@pytest.mark.slow
def test_preempt_node_with_requeue_runs_the_job_again_on_new_nodes(emu, ml):
    job = submit(
        ml, "echo ready; sleep 60", compute="warm", nodes=2, distribution={"type": "pytorch"}
    )
    wait_log(emu, job.name, 0, "ready")
    before = {n["node_id"] for n in emu.job_nodes(job.name)}
    emu.preempt_node(job.name, 0, requeue=True)
    # the job goes back to the queue and starts again, the preempted VM replaced
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        nodes = emu.job_nodes(job.name)
        ids = {n["node_id"] for n in nodes}
        running = emu.job_status(job.name) == "Running" and all(n["pid"] for n in nodes)
        if running and len(nodes) == 2 and ids != before:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the job did not run again on new nodes: {nodes}")
    assert len(ids) == 2 and ids != before  # rank 0's VM is a new one
    ml.jobs.begin_cancel(job.name).result()
    assert emu.wait_job(job.name, 20) == "Canceled"


def test_provisioning_delay_shows_preparing(emu, ml):
    emu.provisioning_delay = 1.0
    try:
        job = submit(ml, "echo provisioned")
        assert emu.wait_job(job.name, 5, statuses=["Preparing"]) == "Preparing"
        assert _status(ml.jobs.get(job.name)) == "Preparing"
    finally:
        emu.provisioning_delay = 0.0
    assert emu.wait_job(job.name, 20) == "Completed"


def test_job_names_are_unique_forever_only_tags_may_change(emu, ml):
    # AML refuses a second PUT of an existing name unless it changes only description,
    # tags, displayName, properties or isArchived; an identical PUT (a client retry) is fine.
    from azure.ai.ml import command
    from azure.core.exceptions import HttpResponseError

    def job(text: str, version: str):
        return command(
            command=text,
            compute="cpu-cluster",
            environment="azureml:dask-env:1",
            experiment_name="emulator-tests",
            name="fixed-name-job",
            tags={"v": version},
        )

    ml.jobs.create_or_update(job("echo one", "1"))
    assert emu.wait_job("fixed-name-job", 20) == "Completed"
    ml.jobs.create_or_update(job("echo one", "2"))  # same job, new tag: accepted
    got = ml.jobs.get("fixed-name-job")
    assert got.tags["v"] == "2" and got.command == "echo one"
    with pytest.raises(HttpResponseError, match="already exists") as err:
        ml.jobs.create_or_update(job("echo two", "3"))
    assert err.value.status_code == 400
    assert ml.jobs.get("fixed-name-job").command == "echo one"


@pytest.mark.slow
def test_status_order_is_preparing_then_queued(emu, ml):
    # AML's order (JobStatus): Preparing (the image build) before Queued (waiting for nodes)
    first = submit(
        ml, "echo ready; sleep 30", compute="small", nodes=2, distribution={"type": "pytorch"}
    )
    wait_log(emu, first.name, 0, "ready")
    emu.provisioning_delay = 0.5
    try:
        second = submit(ml, "echo second", compute="small")
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while "Queued" not in seen and time.monotonic() < deadline:
            status = emu.job_status(second.name)
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.05)
    finally:
        emu.provisioning_delay = 0.0
    assert "Preparing" in seen and seen.index("Preparing") < seen.index("Queued"), seen
    ml.jobs.begin_cancel(first.name).result(timeout=30)
    assert emu.wait_job(second.name, 30) == "Completed"
