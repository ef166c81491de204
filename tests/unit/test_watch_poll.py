"""The watch's poll of a cluster's AML jobs (and a start's wait for the scheduler's tag),
against a stand-in for the operations object."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from dask_amlcompute._protocol import cluster_key_tag
from dask_amlcompute.backend.jobwait import wait_for_tag
from dask_amlcompute.backend.ops import JobInfo
from dask_amlcompute.backend.state import (
    ClusterContext,
    ClusterPlan,
    ClusterState,
    Lifecycle,
    Phases,
)
from dask_amlcompute.backend.watch import JobWatch


class FakeOps:
    """Answers the job list with ``listed`` and ``GET /jobs/{name}`` with ``jobs``."""

    def __init__(self, listed: dict[str, str], jobs: dict[str, str]) -> None:
        self.listed, self.jobs = listed, jobs
        self.calls: list[str] = []

    async def list_job_infos(self, tag: str) -> dict[str, JobInfo]:
        self.calls.append(f"list {tag}")
        return {n: JobInfo(n, s) for n, s in self.listed.items()}

    async def get_job(self, name: str) -> JobInfo:
        self.calls.append(f"get {name}")
        return JobInfo(name, self.jobs[name])

    async def run_details(self, name: str) -> tuple[None, dict]:
        return None, {}


def watch(ops: FakeOps, mode: Any = "create") -> JobWatch:
    state = ClusterState(ClusterPlan(mode, None), lifecycle=Lifecycle.RUNNING)
    settings: Any = SimpleNamespace(name="c", poll_interval=1.0)
    return JobWatch(ClusterContext(settings, ops, state, log=lambda _: None))  # type: ignore[arg-type]


def test_poll_lists_once_and_gets_only_jobs_missing_from_the_list():
    ops = FakeOps(
        listed={"c-main": "Running", "c-w0": "Running", "c-w1": "Failed", "other": "Running"},
        jobs={"c-w2": "Canceled"},  # e.g. archived
    )
    w = watch(ops)
    ended: list[tuple[str, str]] = []

    async def on_end(info: JobInfo) -> None:
        ended.append((info.name, info.status))

    for name in ("c-main", "c-w0", "c-w1", "c-w2"):
        w.follow(name, on_end)
    asyncio.run(w.poll())
    assert ops.calls == [f"list {cluster_key_tag('c')}", "get c-w2"]
    assert sorted(ended) == [("c-w1", "Failed"), ("c-w2", "Canceled")]
    assert set(w.followed) == {"c-main", "c-w0"}  # ended jobs are no longer watched
    assert w.context.state.jobs == {"c-main": "Running", "c-w0": "Running", "c-w1": "Failed",
                              "c-w2": "Canceled"}  # fmt: skip


def test_poll_reports_the_main_job_from_finalizing_and_nothing_while_closing():
    ops = FakeOps(listed={"c-main": "Finalizing", "c-w0": "Failed"}, jobs={})
    w = watch(ops)
    ended: list[str] = []

    async def on_end(info: JobInfo) -> None:
        ended.append(info.name)

    w.follow("c-main", on_end)
    asyncio.run(w.poll())
    assert ended == ["c-main"]
    w.context.state.lifecycle = Lifecycle.CLOSING
    w.follow("c-w0", on_end)
    asyncio.run(w.poll())
    assert ended == ["c-main"] and not w.followed
    asyncio.run(w.poll())  # nothing watched: no request
    assert ops.calls == [f"list {cluster_key_tag('c')}"] * 2


def test_a_status_gone_back_in_the_list_only_is_confirmed_with_one_get():
    from dask_amlcompute.backend.jobs import MainJob

    ops = FakeOps(listed={"c-main": "Preparing"}, jobs={"c-main": "Running"})  # the list lags
    w = watch(ops)
    w.context.state.jobs["c-main"] = "Running"
    main = MainJob(w.context, connector=None, watch=w)
    w.follow("c-main", main._job_ended, main._main_update)
    asyncio.run(w.poll())
    assert ops.calls == [f"list {cluster_key_tag('c')}", "get c-main"]
    assert w.context.state.lost_reason is None and w.context.state.jobs["c-main"] == "Running"


def test_a_start_that_timed_out_says_the_job_was_cancelled_only_if_it_was():
    from dask_amlcompute.exceptions import StartupTimeoutError

    for mode, cancelled in (("create", True), ("attach", False)):  # from_name cancels nothing
        w = watch(FakeOps(listed={}, jobs={"c-main": "Running"}), mode)
        with pytest.raises(StartupTimeoutError, match="did not start within 0s") as err:
            asyncio.run(wait_for_tag(w.context, "c-main", "tag", 0.0, Phases()))
        assert ("The job was cancelled." in str(err.value)) is cancelled
