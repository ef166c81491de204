"""Node process groups die with the emulator, even when it is SIGKILLed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _emu_helpers import wait_for

from aml_emulator.reaper import GroupReaper, group_running


def _alive(pgid: int) -> bool:
    """A member of the group still runs (an exited member waiting for PID 1 to reap it does not)."""
    return group_running(pgid)


def _members(pgid: int) -> list[str]:
    """``pid state command`` of every process in group ``pgid``, for failure messages."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError):
            head, tail = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
            if int(tail.split()[2]) == pgid:
                out.append(f"{pid} {tail.split()[0]} {head.split('(', 1)[1]}")
    return out


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "600"], start_new_session=True)


def test_closing_the_pipe_reaps_registered_groups_only():
    watched, forgotten, unknown = _sleeper(), _sleeper(), _sleeper()
    reaper = GroupReaper()
    try:
        reaper.watch(watched.pid)
        reaper.watch(forgotten.pid)
        reaper.forget(forgotten.pid)
        helper = reaper.pid
        reaper.close()  # what the kernel does to the pipe when the emulator dies
        assert watched.wait(10) == -signal.SIGTERM
        assert forgotten.poll() is None and unknown.poll() is None
        assert helper is not None and not Path(f"/proc/{helper}").exists()
    finally:
        for proc in (watched, forgotten, unknown):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _children(pid: int, word: str) -> list[int]:
    """PIDs of the children of ``pid`` whose command line has ``word``."""
    found = []
    for child in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError):
            ppid = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and word in Path(f"/proc/{child}/cmdline").read_text():
                found.append(int(child))
    return found


@pytest.mark.slow
def test_sigkilled_emulator_leaves_no_node_running(tmp_path):
    import requests
    from _emu_helpers import submit

    from aml_emulator import identity, make_ml_client

    config = tmp_path / "emulator.json"
    config.write_text(json.dumps({"workdir": str(tmp_path),
                                  "computes": [{"name": "cpu-cluster", "max_nodes": 2}],
                                  "environments": [{"name": "dask-env", "version": "3",
                                                    "image": "python:3.11"}]}))  # fmt: skip
    log = open(tmp_path / "emulator.out", "w")  # noqa: SIM115  closed below
    emulator = subprocess.Popen(
        [sys.executable, "-m", "aml_emulator.cli", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    pidfile = tmp_path / "node.pid"
    pgid = azurite = None
    try:
        url = wait_for(lambda: _served_url(tmp_path / "emulator.out"), 60, "the emulator")
        # a code upload starts the workspace storage (Azurite, its own process group)
        upload = f"{url}{identity.child_id('codes', 'c', 'versions', '1')}/startPendingUpload"
        requests.post(upload, params={"api-version": "2023-04-01"}, json={}, timeout=60)
        azurite = wait_for(lambda: _children(emulator.pid, "azurite"), 10, "Azurite")[0]
        submit(
            make_ml_client(url),
            f"echo $$ > {pidfile}; sleep 600",
            nodes=1,
            environment="azureml:dask-env:3",
        )
        pgid = int(wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), 60,
                            "the node to start"))  # fmt: skip
        assert _alive(pgid)
        os.kill(emulator.pid, signal.SIGKILL)
        emulator.wait(10)
        try:
            wait_for(lambda: not _alive(pgid), 20, "the node group to be reaped")
            wait_for(lambda: not _alive(azurite), 20, "Azurite's group to be reaped")
        except AssertionError as exc:
            log.flush()
            tail = (tmp_path / "emulator.out").read_text()[-2000:]
            raise AssertionError(
                f"{exc}; group {pgid}: {_members(pgid)}; emulator:\n{tail}"
            ) from None
    finally:
        if emulator.poll() is None:
            os.killpg(emulator.pid, signal.SIGKILL)
            emulator.wait(10)
        for group in (pgid, azurite):  # the node and the Azurite our emulator started
            if group is not None and _alive(group):
                os.killpg(group, signal.SIGKILL)
        log.close()


def _served_url(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        if "serving at " in line:
            return line.split("serving at ", 1)[1].split()[0]
    time.sleep(0.1)
    return None
