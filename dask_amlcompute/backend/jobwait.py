"""Waiting for an AML job to publish a run tag, and explaining why a job ended.

:func:`wait_for_tag` polls a job (with back-off, bounded) until its scheduler
publishes a tag; :func:`job_error` turns an ended or stuck job into a typed
error carrying AML's own message and the tail of the node logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..exceptions import JobCanceledError, JobError, JobFailedError, StartupTimeoutError
from .ops import JobInfo

if TYPE_CHECKING:
    from .ops import AmlOps
    from .state import ClusterContext

__all__ = ["LIKELY_CAUSES", "RUN_HISTORY_FALLBACK_AFTER", "job_error", "wait_for_tag"]

logger = logging.getLogger(__name__)


#: Seconds a job may run without its tag on the job resource before run history is read too.
RUN_HISTORY_FALLBACK_AFTER = 10.0

LIKELY_CAUSES = {
    "NotStarted": "AML has not scheduled the job yet; the workspace may be throttling or busy.",
    "Starting": "AML is starting the job.",
    "Queued": (
        "the compute has no free nodes: other jobs hold them, the compute's max nodes is "
        "reached, or the subscription's core quota is exhausted."
    ),
    "Preparing": (
        "the nodes are being provisioned or the environment image is being built/pulled; "
        "the first run of a new environment can take 10-20 minutes."
    ),
    "Running": (
        "the nodes run but the scheduler did not publish its address: check the node logs "
        "(import errors, mlflow/azureml-mlflow missing in the environment)."
    ),
}


async def job_error(
    ops: AmlOps, info: JobInfo, message: str, cls: type[JobError] | None = None
) -> JobError:
    """A typed error for a job, with AML's error message and the node log tail."""
    aml_message, log_files = await ops.run_details(info.name)
    tail = await ops.log_tail(log_files) if log_files else None
    if aml_message:
        message = f"{message}\nAML says: {aml_message}"
    if cls is None:
        cls = JobCanceledError if info.status == "Canceled" else JobFailedError
    return cls(
        message, job_name=info.name, status=info.status, studio_url=info.studio_url, log_tail=tail
    )


async def wait_for_tag(ctx: ClusterContext, job_name: str, tag: str, timeout: float) -> JobInfo:
    """Poll a job until it publishes ``tag``; fail fast if it ends; bounded by ``timeout``.

    Polling starts fast and backs off to ``settings.poll_interval``. The tag is
    read from the job resource; once the job has run for
    :data:`RUN_HISTORY_FALLBACK_AFTER` seconds without it there, each poll also
    reads the run's own tags in run history (where ``mlflow.set_tag`` writes).
    """
    deadline = time.monotonic() + timeout
    delay = min(0.2, ctx.settings.poll_interval)
    last_status = None
    started = time.monotonic()
    running_since: float | None = None
    while True:
        info = await ctx.ops.get_job(job_name)
        ctx.state.jobs[job_name] = info.status
        if info.status != last_status:
            ctx.log(f"AML job {job_name}: {info.status} ({time.monotonic() - started:.0f}s)")
            last_status = info.status
            delay = min(0.2, ctx.settings.poll_interval)  # things move: look again soon
        if info.status == "Running" and running_since is None:
            running_since = time.monotonic()
            ctx.state.mark("Running")
        if tag in info.tags:
            return info
        if running_since is not None and (
            time.monotonic() - running_since >= RUN_HISTORY_FALLBACK_AFTER
        ):
            merged = await ctx.ops.with_run_tags(info)
            if tag in merged.tags:
                logger.info("Read %s of %s from run history (not on the job yet)", tag, job_name)
                return merged
        if info.terminal:
            raise await job_error(
                ctx.ops,
                info,
                f"AML job {job_name} ended {info.status} while the Dask cluster was starting.",
            )
        if time.monotonic() >= deadline:
            cause = LIKELY_CAUSES.get(info.status, "")
            raise await job_error(
                ctx.ops,
                info,
                f"The Dask scheduler did not start within {timeout:.0f}s (startup_timeout). "
                f"The job is {info.status}: {cause} The job was cancelled.",
                StartupTimeoutError,
            )
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, ctx.settings.poll_interval)
