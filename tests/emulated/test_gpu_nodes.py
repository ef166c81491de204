"""GPU sizes: dask-cuda workers (one per GPU, resources GPU=1) and AML's CUDA base image.

The default environment pins the dask-cuda release that runs the client's dask; with a dask no
release supports, the cluster is refused before anything is submitted.

No machine here has a GPU: these tests check what is submitted (the job's command, environment
and worker groups) against the emulator's GPU sizes, and that a node without dask-cuda says so.
A dask-cuda worker has not run in this project's CI (see docs: GPU nodes).
"""

from __future__ import annotations

import asyncio
import re

import dask
import pytest
from _helpers import GPU_DASK, NO_GPU_DASK

from dask_amlcompute import (
    AmlComputeCluster,
    ConfigurationError,
    EnvironmentBuildError,
    JobFailedError,
)
from dask_amlcompute._protocol import NodeOptions
from dask_amlcompute.backend.daskcuda import CUDA_IMAGE, dask_cuda_requirement
from dask_amlcompute.backend.environment import DEFAULT_IMAGE, local_python
from dask_amlcompute.backend.jobwait import job_error
from dask_amlcompute.backend.ops import AmlOps

GPU_SIZE = "Standard_NC24s_v3"  # emulator catalogue: 4 GPUs, 24 vCPUs


@pytest.fixture(scope="module")
def gpu_compute(ml_client):
    from azure.ai.ml.entities import AmlCompute

    name = "gpu-nodes"
    ml_client.compute.begin_create_or_update(
        AmlCompute(name=name, size=GPU_SIZE, max_instances=2)
    ).result()
    yield name
    ml_client.compute.begin_delete(name).result()


def _prepared(ml_client, **kwargs):
    """The cluster's main job as it would be submitted (nothing is submitted)."""

    async def main():
        cluster = AmlComputeCluster(ml_client, asynchronous=True, **kwargs)
        await cluster._prepare()
        return cluster, cluster.job_spec()

    return asyncio.run(main())


def _environment(ml_client, cluster):
    """The environment the plan registered for the cluster's jobs."""
    return ml_client.environments.get(*cluster._context.plan.environment.split(":"))


def _argv(spec) -> NodeOptions:
    command = spec["properties"]["command"]
    argv = command.split("-m dask_amlcompute.node", 1)[1].split()
    return NodeOptions.from_argv(argv)


def test_gpu_size_gives_dask_cuda_workers_and_the_cuda_image(ml_client, gpu_compute, client_dask):
    client_dask(GPU_DASK)
    cluster, spec = _prepared(ml_client, compute=gpu_compute, n_nodes=2, name="gpu-plan")
    node = _argv(spec)
    assert node.cuda and node.processes == 4  # one worker per GPU
    assert cluster._main_workers == 8  # 2 nodes x 4 GPUs (the scheduler's node too)
    environment = _environment(ml_client, cluster)
    assert environment.image == CUDA_IMAGE
    pip = environment.conda_file["dependencies"][-1]["pip"]
    assert dask_cuda_requirement(GPU_DASK, local_python()) in pip and f"dask=={GPU_DASK}" in pip
    logs = "\n".join(line for _, line in cluster._cluster_manager_logs)
    assert "4 GPU(s) per node, one dask-cuda worker per GPU" in logs
    # the user's choices win: CPU workers, their own environment
    cluster, spec = _prepared(
        ml_client, compute=gpu_compute, n_nodes=1, gpu_workers="none", name="gpu-plan-cpu"
    )
    assert not _argv(spec).cuda and _environment(ml_client, cluster).image == DEFAULT_IMAGE
    cluster, spec = _prepared(
        ml_client, compute=gpu_compute, n_nodes=1, environment="my/image:1", name="gpu-plan-own"
    )
    assert _argv(spec).cuda and _environment(ml_client, cluster).image == "my/image:1"


def test_cpu_size_keeps_cpu_workers(ml_client, cluster_kwargs):
    cluster, spec = _prepared(ml_client, n_nodes=1, name="cpu-plan", **cluster_kwargs)
    assert not _argv(spec).cuda
    assert _environment(ml_client, cluster).image == DEFAULT_IMAGE


def test_gpu_node_without_dask_cuda_fails_saying_so(ml_client, gpu_compute, cluster_kwargs):
    # a user image without dask-cuda (the emulator runs its own interpreter for it)
    kwargs = {
        **cluster_kwargs,
        "compute": gpu_compute,
        "environment": "docker.io/library/python:3.11",
    }
    # The node fails just after publishing its address; the start surfaces the job's error
    # once SpecCluster's connection to the dead scheduler gives up: a short connect timeout.
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "5s"}),
        pytest.raises(JobFailedError, match="needs dask-cuda in the node environment"),
    ):
        AmlComputeCluster(ml_client, n_nodes=1, name="gpu-no-cuda", **kwargs)


def test_a_dask_without_dask_cuda_is_refused_before_submitting(
    emulator, ml_client, gpu_compute, client_dask
):
    client_dask(NO_GPU_DASK)
    refusal = f"No dask-cuda release runs with dask {re.escape(NO_GPU_DASK)}"
    with pytest.raises(ConfigurationError, match=refusal):
        AmlComputeCluster(ml_client, compute=gpu_compute, n_nodes=1, name="gpu-refused")
    assert not [j.name for j in ml_client.jobs.list() if "gpu-refused" in j.name]
    # the way out the message names: plain Dask workers on the GPU nodes
    _, spec = _prepared(
        ml_client, compute=gpu_compute, n_nodes=1, gpu_workers="none", name="gpu-refused-cpu"
    )
    assert not _argv(spec).cuda


def test_job_ssh_is_refused_on_the_default_gpu_environment(ml_client, gpu_compute, client_dask):
    client_dask(GPU_DASK)
    with pytest.raises(ConfigurationError, match="openssh-server") as info:
        _prepared(ml_client, compute=gpu_compute, n_nodes=1, connect="job-ssh", name="gpu-ssh")
    assert "gpu_workers='none'" in str(info.value) and "env --gpu" in str(info.value)
    cluster, _ = _prepared(ml_client, compute=gpu_compute, n_nodes=1, name="gpu-auto")
    logs = "\n".join(line for _, line in cluster._cluster_manager_logs)
    assert "only the direct connection can work" in logs  # connect="auto": said, not refused
    # the user's image or CPU workers: the job SSH path is theirs to have
    _prepared(
        ml_client, compute=gpu_compute, n_nodes=1, connect="job-ssh", environment="my/image:1",
        name="gpu-ssh-own",
    )  # fmt: skip
    _prepared(
        ml_client, compute=gpu_compute, n_nodes=1, connect="job-ssh", gpu_workers="none",
        name="gpu-ssh-cpu",
    )  # fmt: skip


@pytest.mark.slow
def test_an_unbuildable_gpu_environment_fails_in_the_build_as_on_aml(
    emulator, ml_client, gpu_compute
):
    # What the library submitted before it pinned dask-cuda: the client's dask beside a
    # dask-cuda whose rapids-dask-dependency pins another. The emulator resolves it with the
    # real installer in the build step, so the job fails there, as AML's image build does.
    from azure.ai.ml import command
    from azure.ai.ml.entities import Environment

    from aml_emulator.envbuild import BUILD_FAILED_MESSAGE

    conda = {
        "name": "gpu-unbuildable",
        "channels": ["conda-forge"],
        "dependencies": [
            f"python={local_python()}",
            "pip",
            {
                "pip": [
                    f"dask=={NO_GPU_DASK}",
                    f"distributed=={NO_GPU_DASK}",
                    dask_cuda_requirement(GPU_DASK, local_python()),
                ]
            },
        ],
    }
    job = ml_client.jobs.create_or_update(
        command(
            command="echo never",
            compute=gpu_compute,
            environment=Environment(image=CUDA_IMAGE, conda_file=conda),
        )
    )
    assert emulator.wait_job(job.name, 300) == "Failed"
    assert emulator.job_error(job.name)["message"] == BUILD_FAILED_MESSAGE
    assert "echo never" not in emulator.node_log(job.name, 0)

    async def library_error():  # what a cluster would raise: the build log names the conflict
        ops = AmlOps(ml_client)
        return await job_error(ops, await ops.get_job(job.name), "x")

    error = asyncio.run(library_error())
    assert isinstance(error, EnvironmentBuildError), error
    assert "rapids-dask-dependency" in (error.log_tail or ""), error.log_tail
