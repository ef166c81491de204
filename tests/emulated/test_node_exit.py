"""How a node's process ends: the exit code AML turns into the job's status.

A node that exits non-zero makes AML report the whole job Failed, so a cluster
closed while it is still starting (the client refused its versions, or the user
closed it at once) must not leave a node exiting 1. These tests run the real node
entry point (``python -m dask_amlcompute.node``) as a process against a real
scheduler.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import pytest
from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import open_port

pytestmark = pytest.mark.timeout(120)


class CloseOnFirstWorker(SchedulerPlugin):
    """Close the scheduler as soon as one worker has joined (the version check does this)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def add_worker(self, scheduler=None, worker=None):
        asyncio.get_running_loop().call_soon(
            lambda: asyncio.ensure_future(self.scheduler.close(reason="test"))
        )


def _node(cwd, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZ", "MASTER", "RANK"))}
    # a one-node job whose master is this loopback (as the emulator's nodes share one): without
    # MASTER_ADDR a node takes its host name's address and refuses a loopback one
    env["MASTER_ADDR"] = "127.0.0.1"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dask_amlcompute.node",
            "--role",
            "workers",
            "--name-prefix",
            "t",
            "--threads",
            "1",
            "--memory-limit",
            "0",
            *args,
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        log, _ = proc.communicate()
        raise AssertionError(f"the node did not exit within {timeout}s; its log:\n{log}") from None
    assert proc.stdout is not None
    return code, proc.stdout.read()


def test_scheduler_closing_while_workers_join_is_a_normal_end(tmp_path):
    asyncio.run(_test_scheduler_closing_while_workers_join_is_a_normal_end(tmp_path))


async def _test_scheduler_closing_while_workers_join_is_a_normal_end(tmp_path):
    # processes=4 on 2 cores: the first worker joins well before the last, and
    # the scheduler closes at the first join
    scheduler = Scheduler(host="127.0.0.1", port=0, dashboard_address=":0")
    await scheduler
    scheduler.add_plugin(CloseOnFirstWorker(scheduler))
    proc = _node(tmp_path, "--scheduler-address", scheduler.address, "--processes", "4")
    code, log = await _wait(proc, 90)
    await scheduler.close()
    assert "closed while the workers on node rank 0 were joining it" in log, log
    assert code == 0, log


def test_unreachable_scheduler_is_still_a_failure(tmp_path):
    asyncio.run(_test_unreachable_scheduler_is_still_a_failure(tmp_path))


async def _test_unreachable_scheduler_is_still_a_failure(tmp_path):
    # nothing listens on this port: the workers never join, the node fails (exit 1)
    port = open_port("127.0.0.1")
    proc = _node(tmp_path, "--scheduler-address", f"tcp://127.0.0.1:{port}", "--death-timeout", "3")
    code, log = await _wait(proc, 60)
    assert code == 1, log
    assert "could not join the scheduler" in log, log


def _read_to(stream, text: str) -> str:
    """Lines of ``stream`` up to the first with ``text`` (all of it if none has)."""
    lines = []
    for line in stream:
        lines.append(line)
        if text in line:
            break
    return "".join(lines)


def test_sigterm_while_joining_exits_cleanly(tmp_path):
    asyncio.run(_test_sigterm_while_joining_exits_cleanly(tmp_path))


async def _test_sigterm_while_joining_exits_cleanly(tmp_path):
    # AML cancelling the job while the workers still try to join: exit 0, no worker left
    port = open_port("127.0.0.1")
    proc = _node(
        tmp_path, "--scheduler-address", f"tcp://127.0.0.1:{port}", "--death-timeout", "60"
    )
    # its first log line comes once SIGTERM is handled: a signal before it (a start slowed
    # by a busy machine) would kill the node, or be lost where the parent ignores SIGTERM
    assert proc.stdout is not None
    head = await asyncio.wait_for(asyncio.to_thread(_read_to, proc.stdout, "Node context"), 60)
    assert "Node context" in head, head
    await asyncio.sleep(1)  # polling the port
    proc.send_signal(signal.SIGTERM)
    code, log = await _wait(proc, 30)
    assert "Stopped while the workers were joining the scheduler" in log, log
    assert code == 0, log


def test_worker_node_started_before_its_scheduler_joins_it_and_exits_with_it(tmp_path):
    asyncio.run(_test_worker_node_started_before_its_scheduler(tmp_path))


async def _test_worker_node_started_before_its_scheduler(tmp_path):
    # as on AML, ranks above 0 start with rank 0: the node polls the port, then joins; when
    # the scheduler closes, the node stops its workers and exits 0
    port = open_port("127.0.0.1")
    proc = _node(tmp_path, "--scheduler-address", f"tcp://127.0.0.1:{port}")
    await asyncio.sleep(2)
    lines: list[str] = []  # the node's log as it comes (its nanny started: then close)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    async with Scheduler(host="127.0.0.1", port=port, dashboard=False) as scheduler:
        deadline = asyncio.get_running_loop().time() + 60
        while not (scheduler.workers and any("Started 1 worker(s)" in x for x in lines)):
            assert asyncio.get_running_loop().time() < deadline, "the worker never joined"
            await asyncio.sleep(0.05)
    try:
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
    finally:
        proc.kill()  # a no-op once it exited
        reader.join(10)
    assert code == 0, "".join(lines)
