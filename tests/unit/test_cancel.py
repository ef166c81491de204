"""ops.cancel on a job that is finishing: no error for the user, nothing left behind (unit)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from dask_amlcompute.backend.ops import AmlOps


class Jobs:
    """``ml_client.jobs``: each ``get`` answers the next status; AML refuses every cancel."""

    def __init__(self, *statuses: str) -> None:
        self.statuses, self.cancels = list(statuses), 0

    def get(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, status=self.statuses.pop(0), tags={}, studio_url=None)

    def begin_cancel(self, name: str, polling: bool = True) -> None:
        self.cancels += 1
        raise RuntimeError(f"(UserError) Job {name} cannot be canceled in its current state")


def _cancel(jobs: Jobs, **kwargs) -> str | None:
    return asyncio.run(AmlOps(SimpleNamespace(jobs=jobs)).cancel("j-w0", **kwargs))


def test_a_finalizing_job_is_left_to_end(caplog):
    caplog.set_level(logging.WARNING)
    jobs = Jobs("Finalizing")
    assert _cancel(jobs) == "Finalizing" and jobs.cancels == 0  # its nodes are being released
    assert _cancel(Jobs(), status="Finalizing") == "Finalizing"  # as the caller just read it
    # Running when read, Finalizing then Completed when AML got the cancel: refused, no failure
    for ended in ("Finalizing", "Completed"):
        jobs = Jobs("Running", ended)
        assert _cancel(jobs, wait=False) == ended and jobs.cancels == 1
    assert not caplog.records
    # still running: the refusal is a failure, said once (the reaper tries again at exit)
    assert _cancel(Jobs("Running", "Running")) is None
    assert "Cancelling AML job j-w0 failed" in caplog.text
