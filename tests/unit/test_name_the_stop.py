"""Rank 0 names why AML stops the job in the errors of the work in flight (issue 26)."""

from __future__ import annotations

import asyncio
import time

import pytest
from distributed import Client, Scheduler, Worker

from dask_amlcompute import ClusterLostError
from dask_amlcompute.node.plugins import NameTheStop


def test_the_reason_says_what_rank_0_knows():
    plugin = NameTheStop("dask-x-main", job_timeout=1800)
    assert "cancelled from outside the cluster, or preempted" in plugin.reason("job", 60.0)
    assert "job_timeout (1800 s) was reached" in plugin.reason("job", 1790.0)
    plugin.lost_ranks = ["2"]
    reason = plugin.reason("dask-x-main", 1790.0)
    assert "AML is stopping job dask-x-main: node rank 2 failed or was preempted" in reason
    assert "start a new cluster" in reason


def test_only_a_main_job_worker_that_left_without_closing_is_a_lost_node():
    class FakeScheduler:  # only what add_worker reads
        workers: dict = {}

    plugin, scheduler = NameTheStop("dask-x-main"), FakeScheduler()
    for address, name in [("a", "dask-x-main-1-0"), ("b", "dask-x-w1-1-0"), ("c", "dask-x-main-2-0"),
                          ("d", "dask-x-main-0-0")]:  # fmt: skip
        scheduler.workers[address] = type("WS", (), {"name": name})()
        plugin.add_worker(scheduler, address)
    plugin.remove_worker(scheduler, "a", stimulus_id="handle-worker-cleanup-1")
    plugin.remove_worker(scheduler, "b", stimulus_id="handle-worker-cleanup-2")  # a worker job
    plugin.remove_worker(scheduler, "c", stimulus_id="worker-close-3")  # closed: said goodbye
    plugin.remove_worker(scheduler, "d", stimulus_id="handle-worker-cleanup-4")  # rank 0 itself
    assert plugin.lost_ranks == ["1"]


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_work_in_flight_fails_with_the_named_error_and_finished_work_stays():
    async def scenario():
        plugin = NameTheStop("dask-x-main", job_timeout=30)
        async with (
            Scheduler(host="127.0.0.1", dashboard_address=":0") as scheduler,
            Worker(scheduler.address, host="127.0.0.1", nthreads=2),
            Client(scheduler.address, asynchronous=True) as client,
        ):
            scheduler.add_plugin(plugin)
            done = client.submit(sum, [1, 2])
            assert await done == 3
            pending = client.submit(time.sleep, 3, pure=False)
            while getattr(scheduler.tasks.get(pending.key), "state", None) != "processing":
                await asyncio.sleep(0.01)
            assert plugin.fail_work(scheduler, "dask-x-main", started=time.monotonic() - 29.0) == 1
            with pytest.raises(ClusterLostError, match=r"job_timeout \(30 s\) was reached"):
                await asyncio.wait_for(pending, 10)
            assert await done == 3

    asyncio.run(scenario())
