"""Waiting for an AML job to publish a run tag, and explaining why a job ended.

:func:`wait_for_tag` polls a job (back-off, bounded) until its scheduler publishes a tag;
:func:`job_error` turns an ended or stuck job into a typed error with AML's message and the
node log tail; :func:`missing_module_hint` explains tasks failing for a module nodes lack.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import TYPE_CHECKING

from ..exceptions import (
    EnvironmentBuildError,
    JobCanceledError,
    JobError,
    JobFailedError,
    StartupTimeoutError,
)
from .ops import JobInfo

if TYPE_CHECKING:
    from .ops import AmlOps
    from .state import ClusterContext, Phases

logger = logging.getLogger(__name__)

#: Seconds between polls while a running job has not published its address yet ...
RUNNING_POLL = 0.25
#: ... for this many seconds after it started running (then the usual back-off).
RUNNING_FAST_FOR = 30.0
#: Seconds a job may run without its tag on the job resource before run history is read too.
RUN_HISTORY_FALLBACK_AFTER = 10.0

LIKELY_CAUSES = {
    "NotStarted": "AML has not scheduled the job yet; the workspace may be throttling or busy.",
    "Starting": "AML is starting the job.",
    "Preparing": (
        "the node environment's image is being built or pulled; the first run of a new "
        "environment can take 5-20 minutes."
    ),
    "Queued": (
        "AML is allocating the nodes (scaling the compute up from idle takes minutes), or "
        "the compute has no free nodes: other jobs hold them, the compute's max nodes is "
        "reached, or the subscription's core quota is exhausted."
    ),
    "Running": (
        "the nodes run but the scheduler did not publish its address: check the node logs "
        "(import errors, mlflow/azureml-mlflow missing in the environment)."
    ),
}
#: What became of a job that did not start (a reattached cluster's job is not cancelled).
CANCELLED = {"create": " The job was cancelled.", "attach": ""}
#: Statuses with a bound of their own (the setting), not counted in ``startup_timeout``:
#: AML's Preparing (the image build), then Queued (scale-up and quota), then Running
#: (JobStatus, learn.microsoft.com/javascript/api/@azure/arm-machinelearning/jobstatus).
OWN_BOUNDS = {"Preparing": "prepare_timeout", "Queued": "queue_timeout"}

#: The start of AML's error when the environment image does not build ("Image build failed.
#: For more details, check log file azureml-logs/20_image_build_log.txt."; seen in public job
#: output, e.g. github.com/MG-Cafe/MLOps_Workshop issue 8).
IMAGE_BUILD_FAILED = "Image build failed"
IMAGE_BUILD_LOG = "20_image_build_log"  # the log file it names

#: Lines of pip, conda and uv that name a requirement they could not install.
#: (uv wraps its messages at the terminal's width: any whitespace between words)
_UNINSTALLABLE = tuple(
    re.compile(pattern.replace(" ", r"\s+"))
    for pattern in (
        r"No matching distribution found for (\S+)",
        r"Could not find a version that satisfies the requirement (\S+)",
        r"Because (\S+?)(?:\[\S*\])? was not found in the package registry",
        r"Because there (?:is|are) no versions? of (\S+?)(?:\[\S*\])? and you require",
    )
)
_CONDA_LISTS = re.compile(
    r"(?:ResolvePackageNotFound|PackagesNotFoundError)[^\n]*\n((?:\s*\n|\s+- [^\n]+\n)+)"
)


def uninstallable_requirements(build_log: str) -> list[str]:
    """The requirements an image build log (pip, uv, conda) says could not be installed.

    Examples
    --------
    >>> uninstallable_requirements("ERROR: No matching distribution found for foo==1.0")
    ['foo==1.0']
    """
    found: list[str] = []
    for pattern in _UNINSTALLABLE:
        found += [m.group(1).rstrip(".,:") for m in pattern.finditer(build_log)]
    for block in _CONDA_LISTS.finditer(build_log):
        found += re.findall(r"^\s+- (\S+)", block.group(1), flags=re.M)
    return list(dict.fromkeys(found))


async def job_error(
    ops: AmlOps, info: JobInfo, message: str, cls: type[JobError] | None = None
) -> JobError:
    """A typed error for a job, with AML's error message and the node log tail.

    An image build failure becomes :class:`EnvironmentBuildError` naming the
    requirements the build log says could not be installed, with the log's tail.
    """
    aml_message, log_files = await ops.run_details(info.name)
    requirements = None
    if aml_message and IMAGE_BUILD_FAILED in aml_message:
        key = next((k for k in sorted(log_files) if IMAGE_BUILD_LOG in k), None)
        text = await ops.read_log(log_files[key]) if key else None
        requirements = uninstallable_requirements(text or "")
        what = f"see {key or 'the image build log'} for why"
        if requirements:
            what = (
                f"these requirements cannot be installed: {', '.join(requirements)}. Remove or "
                "fix them (pip_packages / conda_packages, or your environment's conda file); "
                "every requirement must come from a package index the build can reach"
            )
        message = f"AML could not build the node environment of job {info.name}: {what}."
        cls, tail = EnvironmentBuildError, "\n".join(text.splitlines()[-30:]) if text else None
    else:
        tail = await ops.log_tail(log_files) if log_files else None
    if aml_message:
        message = f"{message}\nAML says: {aml_message}"
    if cls is None:
        cls = JobCanceledError if info.status == "Canceled" else JobFailedError
    error = cls(
        message, job_name=info.name, status=info.status, studio_url=info.studio_url, log_tail=tail
    )
    if isinstance(error, EnvironmentBuildError):
        error.requirements = requirements or []
    return error


async def refresh(ctx: ClusterContext, job_name: str, when: str) -> JobInfo:
    """GET job ``job_name`` and note its status; its error (``... ended Failed {when}``) if ended."""
    info = await ctx.ops.get_job(job_name)
    ctx.note(info)
    if info.terminal:
        raise await job_error(ctx.ops, info, f"AML job {job_name} ended {info.status} {when}")
    return info


async def failed_error(ops: AmlOps, name: str, timeout: float) -> JobError | None:
    """The error of job ``name`` (AML's message, node log tail) if it has Failed, else None."""
    try:
        info = await asyncio.wait_for(ops.get_job(name), timeout)
    except Exception:
        return None
    why = f"AML job {name} failed while the Dask cluster was starting."
    return await job_error(ops, info, why) if info.status == "Failed" else None


#: What each phase is, shown when a job enters it.
PHASE_MESSAGES = {
    "Preparing": (
        "building the node environment's image (first use of an environment on this "
        "workspace: 5-20 min on AML; later starts reuse the image)"
    ),
    "Queued": "waiting for the nodes (a compute scaling up from idle takes a few minutes)",
}
#: Seconds between "still <status>" progress lines while a job's status does not change.
STILL_WAITING_EVERY = 60.0


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _progress(ctx: ClusterContext, job_name: str, info: JobInfo, elapsed: float, new: bool) -> None:
    """A progress line: the status (and what it means) when it changes, else "still"."""
    hint = ctx.plan.queue_hint if info.status == "Queued" else None
    what = "; ".join(filter(None, [PHASE_MESSAGES.get(info.status) if new else None, hint]))
    what = f": {what}" if what else ""
    when = f"({elapsed:.0f}s)" if new else f"after {_minutes(elapsed)}"
    ctx.log(f"AML job {job_name}: {'' if new else 'still '}{info.status} {when}{what}")


async def wait_for_tag(
    ctx: ClusterContext, job_name: str, tag: str, timeout: float, phases: Phases
) -> JobInfo:
    """Poll a job until it publishes ``tag``; fail fast if it ends; bounded.

    Time in Preparing and Queued is bounded by ``prepare_timeout`` / ``queue_timeout``, not by
    ``timeout`` (``startup_timeout``), and left in ``phases.spent``. Polls back off to
    ``poll_interval``, but stay at :data:`RUNNING_POLL` for :data:`RUNNING_FAST_FOR` s of
    Running; after :data:`RUN_HISTORY_FALLBACK_AFTER` s the tag is read from run history too.
    """
    s, spent = ctx.settings, phases.spent
    started = last_said = since = time.monotonic()
    status: str | None = None  # the last poll's, since ``since``
    spent.update(dict.fromkeys(OWN_BOUNDS, 0.0))
    last_fallback = -math.inf  # when run history was last read for the tag
    while True:
        info = await ctx.ops.get_job(job_name)
        now = time.monotonic()
        ctx.note(info)
        new = info.status != status
        if new or (now - last_said >= STILL_WAITING_EVERY and not info.terminal):
            _progress(ctx, job_name, info, now - started, new)
            last_said = now
        if new:
            delay = min(0.2, s.poll_interval)  # things move: look again soon
        if status in spent:
            spent[status] += now - since
        status, since = info.status, now
        if info.status in (*OWN_BOUNDS, "Running"):
            phases.mark(info.status)
        if tag in info.tags:
            return info
        ran = now - phases.started - phases.reached.get("Running", math.inf)  # -inf: not yet
        if ran >= RUN_HISTORY_FALLBACK_AFTER and now - last_fallback >= s.poll_interval:
            last_fallback = now  # (not at the fast poll's pace)
            merged = await ctx.ops.with_run_tags(info)
            if tag in merged.tags:
                logger.info("Read %s of %s from run history (not on the job yet)", tag, job_name)
                return merged
        if info.terminal:
            why = f"AML job {job_name} ended {info.status} while the Dask cluster was starting."
            raise await job_error(ctx.ops, info, why)
        bound = OWN_BOUNDS.get(info.status)
        own_left = float(getattr(s, bound)) - spent[info.status] if bound else None
        deadline = started + timeout + sum(spent.values())
        if now >= deadline or (own_left is not None and own_left <= 0):
            own = own_left is not None and own_left <= 0
            raise await _timeout(ctx, info, timeout, spent[info.status] if own else None)
        if 0 <= ran < RUNNING_FAST_FOR:
            delay = min(RUNNING_POLL, s.poll_interval)  # the address is moments away
        limit = deadline if own_left is None else now + own_left
        await asyncio.sleep(min(delay, max(0.0, limit - now)))
        delay = min(delay * 1.5, s.poll_interval)


async def _timeout(
    ctx: ClusterContext, info: JobInfo, timeout: float, spent: float | None
) -> JobError:
    """A job past ``startup_timeout``, or (``spent`` there) past its status's own bound."""
    status, cause = info.status, LIKELY_CAUSES.get(info.status, "")
    if spent is None:
        why = (
            f"The Dask scheduler did not start within {timeout:.0f}s (startup_timeout, time in "
            f"Preparing and Queued not counted). The job is {status}: {cause}"
        )
    else:
        setting = OWN_BOUNDS[status]
        hint = f" ({ctx.plan.queue_hint})" if status == "Queued" and ctx.plan.queue_hint else ""
        why = (
            f"The job stayed in {status} for {_minutes(spent)} ({setting}="
            f"{float(getattr(ctx.settings, setting)):.0f}s): {cause}{hint} Raise {setting} to "
            "wait longer."
        )
    return await job_error(ctx.ops, info, why + CANCELLED[ctx.plan.mode], StartupTimeoutError)


def missing_module_hint(module: str) -> str:
    """One line: the nodes lack ``module``, the client's distribution of it, the fix."""
    from importlib.metadata import files, packages_distributions, version

    dists = sorted(set(packages_distributions().get(module.split(".")[0], ())))
    path = module.replace(".", "/") + "/"  # "azure.ai": of the azure-* ones, azure-ai-ml
    dists = [d for d in dists if any(str(f).startswith(path) for f in files(d) or ())] or dists
    found = [f"{d}=={version(d)}" for d in dists]
    fix = (
        f"add pip_packages={found!r}, or use stack='installed'"
        if found
        else "ship its folder with code="
    )
    where = (
        f"this client has it from {', '.join(found)}"
        if found
        else "nor an installed distribution here"
    )
    return f"Tasks failed: the cluster's nodes have no module {module!r} ({where}): {fix}."
