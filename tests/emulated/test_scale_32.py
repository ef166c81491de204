"""Issue 17: a 32-node emulated cluster runs the demo workload and adapts 32 -> 8 -> 32 nodes.

Every node is a real process running the real node entry point (on the
emulator's interpreter: ``build_environments=False``), with one worker thread.
The main job has 8 nodes (the scheduler and a worker on rank 0, a worker on each
other rank) and never goes away, so the cluster reaches 32 nodes with worker
jobs of 4 nodes each (``nodes_per_job=4``): ``scale(nodes=32)`` submits 6 of
them, adaptive scaling with no work retires and cancels all 6 (whole jobs,
never the main job's workers), and a backlog of held tasks makes it submit 6
new ones. Every step is checked against the scheduler's worker count and the
emulator's count of nodes in use, with bounded waits.

Memory limit: 300 MiB per worker. A worker that has run the demo's
``dask.dataframe`` step holds about 175 MiB (pandas and dask.dataframe
imported), which is above the 80 % pause threshold of a 200 MiB limit: every
such worker pauses and the workload stalls.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import FAST_CLUSTER, wait_for
from distributed import Client

from aml_emulator import ComputeSpec, Emulator
from dask_amlcompute import AmlComputeCluster
from dask_amlcompute.cli.demo import workloads
from dask_amlcompute.node.plugins import job_of_worker

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # 32 node processes: both cores

COMPUTE = "scale-32"
#: Nodes of the main job: what adaptive scaling can never go below.
MAIN_NODES = 8
#: Nodes of the whole cluster at full size.
FULL_NODES = 32
NODES_PER_JOB = 4
#: Worker jobs at full size.
WORKER_JOBS = (FULL_NODES - MAIN_NODES) // NODES_PER_JOB
#: Bound on each wait for nodes to join or leave (24 node processes on 2 cores).
STEP_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    """An emulator whose compute holds the 32-node cluster (and a little more)."""
    computes = [ComputeSpec(name=COMPUTE, max_nodes=40)]
    with Emulator(computes=computes, build_environments=False) as emulator:
        yield emulator


def n_workers(client: Client) -> int:
    """Workers the scheduler has now (a fresh query, not a cached view)."""
    return len(client.scheduler_info()["workers"])


def running_worker_jobs(emu: Emulator, cluster: AmlComputeCluster) -> list[str]:
    """The cluster's worker jobs that the emulator runs now.

    Asked of the emulator: ``cluster.jobs`` keeps the last status the watch saw,
    and a worker job the cluster cancelled is no longer watched.
    """
    return [
        j for j in cluster.jobs if j != cluster.main_job_name and emu.job_status(j) == "Running"
    ]


def wait_nodes(
    emu: Emulator, client: Client, cluster: AmlComputeCluster, nodes: int, what: str
) -> None:
    """Wait (bounded) until the cluster has ``nodes`` workers and holds ``nodes`` nodes."""
    wait_for(lambda: n_workers(client) == nodes, STEP_TIMEOUT, f"{what}: {nodes} workers")
    wait_for(lambda: emu.nodes_in_use(COMPUTE) == nodes, 60, f"{what}: {nodes} nodes in use")
    jobs = (nodes - MAIN_NODES) // NODES_PER_JOB
    wait_for(lambda: len(running_worker_jobs(emu, cluster)) == jobs, 60,
             f"{what}: {jobs} worker jobs running")  # fmt: skip


def run_demo_workload(client: Client) -> None:
    """The README demo's workloads (dataframe, bag, delayed, map), each checked."""
    wrong = [(name, got, want) for name, got, want in workloads(client) if got != want]
    assert not wrong, wrong


def test_32_nodes_demo_workload_adapt_32_8_32_and_close(emu: Emulator) -> None:
    timings: dict[str, float] = {}
    start = step = time.monotonic()

    def lap(name: str) -> None:
        nonlocal step
        now = time.monotonic()
        timings[name] = now - step
        step = now

    kwargs: dict[str, Any] = {
        **FAST_CLUSTER,
        "compute": COMPUTE,
        "n_nodes": MAIN_NODES,
        "nodes_per_job": NODES_PER_JOB,
        "memory_limit": "300MiB",
        "startup_timeout": "5m",
        "job_timeout": "20m",
    }
    with (
        AmlComputeCluster(emu.ml_client(), **kwargs) as cluster,
        Client(cluster, timeout=60) as client,
    ):
        assert n_workers(client) == MAIN_NODES
        cluster.scale(nodes=FULL_NODES)
        wait_nodes(emu, client, cluster, FULL_NODES, "start")
        first_jobs = running_worker_jobs(emu, cluster)
        assert len(first_jobs) == WORKER_JOBS
        lap(f"start: {MAIN_NODES}-node main job, scale(nodes={FULL_NODES})")

        run_demo_workload(client)
        lap("demo workload")

        adaptive = cluster.adapt(
            minimum_nodes=MAIN_NODES,
            maximum_nodes=FULL_NODES,
            interval="500ms",
            wait_count=4,
            target_duration="2s",
        )
        wait_nodes(emu, client, cluster, MAIN_NODES, "adapt down, idle")
        for job in first_jobs:
            assert emu.job_status(job) == "Canceled"
        workers = client.scheduler_info()["workers"].values()
        assert {job_of_worker(w["name"]) for w in workers} == {cluster.main_job_name}
        lap(f"adapt {FULL_NODES} -> {MAIN_NODES} (idle)")

        release = f"release-{uuid.uuid4().hex[:8]}"

        def held(i: int) -> int:
            from distributed import Event

            if not Event(release).wait(timeout=STEP_TIMEOUT + 60):
                raise TimeoutError("the test never released the backlog")
            return i

        futures = client.map(held, range(20 * FULL_NODES), pure=False)
        wait_nodes(emu, client, cluster, FULL_NODES, "adapt up, backlog")
        assert not set(first_jobs) & set(running_worker_jobs(emu, cluster))  # new jobs
        adaptive.stop()
        lap(f"adapt {MAIN_NODES} -> {FULL_NODES} (backlog)")

        from distributed import Event

        Event(release, client=client).set()
        assert client.gather(futures) == list(range(20 * FULL_NODES))
        del futures
        lap("backlog released and gathered")
        name = cluster.name
    lap("close")
    wait_for(lambda: emu.nodes_in_use(COMPUTE) == 0, 60, "every node released")
    wait_for(lambda: not [j for j in emu.active_jobs() if j.startswith(name)], 60,
             "no job of the cluster active")  # fmt: skip
    timings["total"] = time.monotonic() - start
    print("\n" + "\n".join(f"{k}: {v:.1f}s" for k, v in timings.items()))
