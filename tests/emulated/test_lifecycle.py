"""Nothing left running, reconnect by name, a flaky control plane: real processes on the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import requests
from _helpers import FAST_CLUSTER, wait_for
from distributed import Client

from aml_emulator import ComputeSpec, Emulator
from dask_amlcompute import AmlComputeCluster
from dask_amlcompute.cli import main as cli_main
from dask_amlcompute.discovery import describe_cluster, list_cluster_jobs
from dask_amlcompute.exceptions import ConfigurationError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    with Emulator(computes=[ComputeSpec(name="life", max_nodes=6)]) as emulator:
        yield emulator


def settings(**extra):
    return {"compute": "life", "n_nodes": 1, **FAST_CLUSTER, **extra}


def run_client_script(emu, body: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = textwrap.dedent(
        f"""
        import os, signal
        from dask_amlcompute import AmlComputeCluster
        from aml_emulator import make_ml_client
        ml = make_ml_client({emu.base_url!r})
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout
    )


def test_killed_client_leaves_nothing_running(emu):
    proc = run_client_script(
        emu,
        f"""
        cluster = AmlComputeCluster(ml, name="killed-client", **{settings(no_client_timeout=4)!r})
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    # no client, no heartbeat: the scheduler stops itself, the nodes exit, the job completes
    assert emu.wait_job("killed-client-main", timeout=60) == "Completed"
    assert emu.nodes_in_use("life") == 0


def test_cluster_object_keeps_it_alive_and_from_name_reconnects_without_owning(emu):
    ml = emu.ml_client()
    with AmlComputeCluster(ml, **{**settings(no_client_timeout=2), "n_nodes": 2}) as cluster:
        time.sleep(5)  # > no_client_timeout: only the cluster's heartbeats keep it up
        assert emu.job_status(cluster.main_job_name) == "Running"
        cluster.scale(3)
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=60)
        other = AmlComputeCluster.from_name(cluster.name, ml, quiet=True, poll_interval=0.2)
        try:
            assert other.settings.compute == "life" and other.settings.n_nodes == 2
            # the rest comes back from the main job's settings tag (not the config defaults)
            assert (other.settings.threads_per_process, other.settings.death_timeout) == (1, 60)
            with Client(other) as client:
                assert len(client.scheduler_info()["workers"]) == 3
                assert sum(client.gather(client.map(lambda x: x + 1, range(10)))) == 55
        finally:
            other.close()

        async def reconnect() -> tuple[int, str]:
            again = await AmlComputeCluster.from_name(
                cluster.name, ml, asynchronous=True, quiet=True, poll_interval=0.2
            )
            async with again:
                return again.settings.n_nodes, again.status.name

        assert asyncio.run(reconnect()) == (2, "running")
        # closing the reconnected objects only disconnected
        assert sorted(j for j in emu.active_jobs() if j.startswith(cluster.name)) == sorted(
            cluster.jobs
        )
        with Client(cluster) as client:
            assert client.submit(sum, [2, 2]).result() == 4
    wait_for(
        lambda: not [j for j in emu.active_jobs() if j.startswith(cluster.name)],
        timeout=60,
        what="jobs ended",
    )


def test_from_name_asynchronous_looks_up_the_cluster_off_the_event_loop(emu):
    from dask_amlcompute.exceptions import AmlComputeError

    emu.inject_http_errors(10, status=429, retry_after=0.4)  # the (concurrent) look-ups: > 1 s

    async def reconnect() -> list[float]:
        ticks: list[float] = []

        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        ticker = asyncio.create_task(tick())
        with pytest.raises(AmlComputeError, match="No dask-amlcompute cluster named 'absent'"):
            await AmlComputeCluster.from_name("absent", emu.ml_client(), asynchronous=True)
        ticker.cancel()
        return ticks

    ticks = asyncio.run(reconnect())
    assert ticks[-1] - ticks[0] > 1 and emu.pending_http_errors() == 0
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.5  # the loop ran on


def test_reconnected_cluster_never_reuses_a_worker_job_name(emu):
    # AML (and the emulator) refuse a second job with an existing name, ended ones included:
    # scale -> scale down -> from_name -> scale must submit a job under a new name.
    ml = emu.ml_client()
    with AmlComputeCluster(ml, **settings()) as cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        (first,) = [j for j in cluster.jobs if j != cluster.main_job_name]
        cluster.scale(1)
        wait_for(lambda: emu.job_status(first) in ("Canceled", "Completed"), 60, "w0 ended")
        other = AmlComputeCluster.from_name(cluster.name, ml, quiet=True, poll_interval=0.2)
        try:
            other.scale(2)
            with Client(other) as other_client:
                other_client.wait_for_workers(2, timeout=60)
            (new,) = [j for j in other.jobs if j != other.main_job_name]
            assert new != first and new.startswith(f"{cluster.name}-w0-")
            other.scale(1)
            wait_for(lambda: emu.job_status(new) in ("Canceled", "Completed"), 60, "job ended")
        finally:
            other.close()


def test_discovery_costs_one_request_however_long_the_job_history(emu, capsys):
    ml = emu.ml_client()

    def job_lists() -> int:  # pages of GET /jobs answered so far
        status = requests.get(emu.base_url + "/emulator/status", timeout=10).json()
        return status["requests"].get("GET JobsHandler", 0)

    # no watch poll lands in the counts
    with AmlComputeCluster(ml, name="history", **settings(watch_interval=600)) as cluster:
        emu.add_past_jobs(cluster.main_job_name, 1000)  # unrelated, ended, not archived
        before = job_lists()
        assert sum(1 for _ in ml.jobs.list()) > 1000  # AML's pages: one request each
        assert job_lists() - before > 10
        calls = {
            "list_cluster_jobs": lambda: list_cluster_jobs(ml, include_ended=True),
            "describe_cluster": lambda: describe_cluster(ml, "history"),
            "cli list": lambda: cli_main(["list", "--all", "--emulator", emu.base_url]),
            "cli logs": lambda: cli_main(["logs", "history", "--emulator", emu.base_url]),
        }
        for what, call in calls.items():
            before = job_lists()
            call()
            assert job_lists() - before <= 2, what
        assert "history" in capsys.readouterr().out
        assert [j.name for j in list_cluster_jobs(ml) if j.cluster == "history"] == [
            cluster.main_job_name
        ]


def test_cli_list_logs_down(emu, capsys):
    cluster = AmlComputeCluster(emu.ml_client(), name="cli-target", **settings())
    try:
        assert cli_main(["list", "--emulator", emu.base_url]) == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if line.startswith("cli-target"))
        assert row.split()[1] == "cluster" and "Running" in row
        assert cli_main(["logs", "cli-target", "--emulator", emu.base_url]) == 0
        out = capsys.readouterr().out
        assert "=== cli-target-main" in out and "Scheduler at" in out
        assert cli_main(["down", "cli-target", "--emulator", emu.base_url]) == 0
        assert "Cancelled cli-target-main" in capsys.readouterr().out
        assert emu.wait_job("cli-target-main", timeout=30) == "Canceled"
        assert cli_main(["list", "--emulator", emu.base_url]) == 0
        assert "cli-target" not in capsys.readouterr().out
    finally:
        cluster.close()
    # a name is never reused: refused before submitting (a PUT would meet AML's 400)
    with pytest.raises(ConfigurationError, match="existed already"):
        AmlComputeCluster(emu.ml_client(), name="cli-target", **settings())
    assert "cli-target-main" not in emu.active_jobs()


def test_a_users_own_client_survives_a_burst_of_8_throttled_responses(emu):
    from azure.ai.ml import MLClient

    from aml_emulator.client import EmulatorTransport

    # Built as a user builds one: azure-core's default retries (3 status retries).
    ml = MLClient(
        emu.credential(),
        emu.subscription_id,
        emu.resource_group,
        emu.workspace_name,
        transport=EmulatorTransport(emu.base_url),
    )
    # 429 + Retry-After: the ARM throttling answer ("Throttling Resource Manager requests").
    emu.inject_http_errors(8, status=429, retry_after=1)
    began = time.monotonic()
    with AmlComputeCluster(ml, **settings()) as cluster, Client(cluster) as client:
        assert emu.pending_http_errors() == 0
        assert time.monotonic() - began < 60  # 8 x Retry-After 1 s + a start of a few seconds
        emu.inject_http_errors(8, status=503)
        cluster.scale(2)
        client.wait_for_workers(2, timeout=90)
        assert emu.pending_http_errors() == 0
        emu.inject_http_errors(3, status=500)  # a failing control plane, while scaling
        cluster.scale(3)
        client.wait_for_workers(3, timeout=90)
        assert client.submit(sum, [1, 1]).result() == 2
        assert emu.pending_http_errors() == 0
        jobs = [j for j in list_cluster_jobs(ml) if j.cluster == cluster.name]
        assert sorted(j.role for j in jobs) == ["cluster", "workers", "workers"]  # no duplicates


def test_node_killed_mid_computation_results_still_correct(emu):
    with AmlComputeCluster(emu.ml_client(), **settings()) as cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        (worker_job,) = [j for j in cluster.jobs if j != cluster.main_job_name]

        def slow_square(x):
            time.sleep(0.1)
            return x * x

        futures = client.map(slow_square, range(60), retries=2)
        time.sleep(1)
        emu.fail_node(worker_job, 0)
        assert client.gather(futures) == [x * x for x in range(60)]


def test_repeated_create_close_leaves_nothing(emu):
    me = psutil.Process(os.getpid())
    before = {c.pid for c in me.children(recursive=True)}
    for _ in range(2):  # each cycle ~5 s on 2 cores; a leak of one cycle shows after any
        with AmlComputeCluster(emu.ml_client(), **settings()) as cluster, Client(cluster) as client:
            assert client.submit(int, "7").result() == 7
            emu.request_log(clear=True)
        # close (issue 28): one status read of the main job, then its cancel, nothing between
        job = cluster.main_job_name
        paths = [(r["method"], r["path"].split("?")[0]) for r in emu.request_log()]
        closing = [f"{m} {p.split('/jobs/', 1)[1]}" for m, p in paths if f"/jobs/{job}" in p]
        assert closing in ([f"GET {job}", f"POST {job}/cancel"], [f"GET {job}"]), closing
        emu.wait_job(cluster.main_job_name, timeout=30)
    wait_for(lambda: not emu.active_jobs(), timeout=30, what="no active job")
    assert emu.nodes_in_use("life") == 0

    # the emulator starts Azurite (its blob service, kept for the session) at the first upload
    def children() -> set[int]:
        pids = set()
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # gone while listed: not a leak
                if not any("azurite" in arg for arg in child.cmdline()):
                    pids.add(child.pid)
        return pids

    wait_for(
        lambda: children() <= before,
        timeout=30,
        what="node processes gone",
    )
