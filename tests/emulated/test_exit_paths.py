"""Nothing billed after any exit: a real client process ends in every way, its jobs end.

Each client is a Python process of its own running a cluster (main job + one worker job) on
the emulator. It ends without ``close()``: falling off the end of the script, an unhandled
exception, Ctrl-C, SIGTERM (what a kernel restart sends), the cluster dropped and collected,
after the main job was requeued, or SIGKILL before it ever reached its scheduler (then only
the scheduler's ``first_contact_timeout`` can end the job). The time from the exit to every
job ended is printed (``pytest -s``) and asserted to be seconds, not ``startup_timeout``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from _helpers import FAST_CLUSTER, wait_for

from aml_emulator import ComputeSpec, Emulator

pytestmark = pytest.mark.slow

#: Seconds within which every job must have ended; the old bound was startup_timeout (90 s here).
ENDED_WITHIN = 15.0
ENDED = ("Canceled", "Completed", "Failed")

#: What the client does once its cluster runs and the test says go (a line on stdin).
EXITS = {
    "interpreter exit": "",
    "unhandled exception": "raise RuntimeError('boom')",
    "cluster dropped": "del cluster\nimport gc; gc.collect()",
    "requeued main job, then exit": "",
}


@pytest.fixture(scope="module")
def emu():
    with Emulator(computes=[ComputeSpec(name="exits", max_nodes=6)]) as emulator:
        yield emulator


def start_client(emu, name: str, then: str = "", **extra) -> subprocess.Popen:
    """A client process whose cluster runs a main job and a worker job; it prints "up"."""
    settings = {"compute": "exits", "n_nodes": 1, **FAST_CLUSTER, **extra}
    script = textwrap.dedent(
        f"""
        import logging, signal, sys, time
        logging.basicConfig()
        logging.getLogger("dask_amlcompute.backend.reaper").setLevel("INFO")  # what it cancels
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a harness may ignore it
        from dask_amlcompute import AmlComputeCluster
        from aml_emulator import make_ml_client
        cluster = AmlComputeCluster(make_ml_client({emu.base_url!r}), name={name!r},
                                    **{settings!r})
        cluster.scale(2)
        while len(cluster.jobs) < 2:
            time.sleep(0.05)
        print("up", flush=True)
        sys.stdin.readline()
        """
    ) + textwrap.dedent(then)
    # stderr goes to a file read at the end: a pipe could fill up and block the client
    err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by finish)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    proc.err_file = err  # type: ignore[attr-defined]
    return proc


def jobs_of(emu, name: str) -> list[str]:
    return sorted(j for j in emu.active_jobs() if j.startswith(f"{name}-"))


def seconds_until_ended(emu, jobs: list[str], since: float) -> float:
    """Wait (bounded) until every job has ended; seconds from ``since``."""
    wait_for(
        lambda: all(emu.job_status(j) in ENDED for j in jobs), 120, f"{jobs} ended", interval=0.05
    )
    return time.monotonic() - since


def finish(proc: subprocess.Popen) -> str:
    """Wait (bounded) for the client to end; its stderr."""
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with proc.err_file as err:  # type: ignore[attr-defined]
        err.seek(0)
        return err.read()


def run_exit(emu, kind: str, name: str, then: str = "", sig: int | None = None):
    """Start a client, end it as ``kind`` says, return (seconds until jobs ended, stderr, rc)."""
    requeue = kind.startswith("requeued")
    # requeued: a watch that never polls in time, so only the exit can cancel
    proc = start_client(emu, name, then, **({"watch_interval": 120} if requeue else {}))
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "up", finish(proc)[-3000:]
        jobs = jobs_of(emu, name)
        assert len(jobs) == 2, jobs
        if requeue:
            # AML runs the main job again on a new node: its old scheduler is gone, the new one
            # has never heard of this client. Exit before the client's watch notices.
            emu.preempt_node(f"{name}-main", 0, requeue=True)
        since = time.monotonic()
        if sig is None:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        else:
            proc.send_signal(sig)
        elapsed = seconds_until_ended(emu, jobs, since)
        statuses = [emu.job_status(j) for j in jobs]
        print(f"\n{kind}: every job ended {elapsed:.2f}s after the exit ({statuses})")
    finally:
        err = finish(proc)
    if kind != "close()":
        assert statuses == ["Canceled", "Canceled"], statuses
        assert elapsed < ENDED_WITHIN
        # cancelled once, by the exit hook: no failed attempt on a shut-down executor
        assert "Cancelling AML job" not in err, err[-3000:]
        assert err.count("its cluster was not closed") == 2, err[-3000:]
    return err, proc.returncode


@pytest.mark.parametrize("kind", list(EXITS))
def test_exit_without_close_cancels_every_job(emu, kind):
    name = "exit-" + kind.split()[0].split(",")[0]
    err, rc = run_exit(emu, kind, name, EXITS[kind])
    assert rc == (1 if kind == "unhandled exception" else 0), err[-3000:]


def test_close_leaves_nothing_for_the_exit_hook(emu):
    err, rc = run_exit(emu, "close()", "exit-close", "cluster.close()")
    assert rc == 0, err[-3000:]
    assert "cluster was not closed" not in err and "Cancelling AML job" not in err, err[-3000:]


@pytest.mark.parametrize(
    ("kind", "sig", "rc"),
    [("Ctrl-C", signal.SIGINT, -signal.SIGINT), ("SIGTERM", signal.SIGTERM, -signal.SIGTERM)],
)
def test_signal_cancels_every_job(emu, kind, sig, rc):
    err, returncode = run_exit(emu, kind, f"exit-{kind.lower()}", sig=sig)
    assert returncode == rc, err[-3000:]  # the signal still ends the process as it would


def test_scheduler_ends_an_orphan_within_first_contact_timeout(emu):
    """A client SIGKILLed before it reached its scheduler: no exit hook runs at all."""
    emu.set_run_tags_on_job(False)  # the client finds the address only after ~10 s
    proc = start_client(emu, "orphan", first_contact_timeout=3)
    try:
        job = "orphan-main"
        wait_for(lambda: job in emu.active_jobs() and emu.job_status(job) == "Running", 60, job)
        time.sleep(1)  # the node starts its scheduler: the first-contact clock runs from there
        proc.kill()
        since = time.monotonic()
        elapsed = seconds_until_ended(emu, [job], since)
    finally:
        finish(proc)
        emu.set_run_tags_on_job(True)
    print(f"\nSIGKILL before first contact: the main job ended {elapsed:.2f}s after the kill")
    # the scheduler shut itself down: the job completed, within seconds, not startup_timeout
    assert emu.job_status(job) == "Completed"
    assert elapsed < 40  # scheduler start (a loaded machine: seconds) + first_contact_timeout
    assert emu.nodes_in_use("exits") == 0
