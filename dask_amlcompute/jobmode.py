"""Job mode: one AML job runs a Dask cluster and your script, and ends with it.

:func:`submit_script` (``dask-amlcompute run``, :mod:`dask_amlcompute.cli.run`)
submits ONE command job: rank 0 starts the scheduler, waits for the workers, runs
the script with ``DASK_SCHEDULER_ADDRESS`` set and exits with its exit code (also
the run tag ``dask_script_exit_code``): the dask-mpi / jobqueue Runner pattern.
The script travels in the job's code snapshot (with its ``code=`` folder). This is
the client side; the in-job side is :mod:`dask_amlcompute.node.script`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from . import config
from ._protocol import (
    EXIT_CODE_TAG,
    OUTPUT_BEGIN,
    OUTPUT_END,
    TAG_MODE,
    NodeOptions,
    ScriptOptions,
)
from .backend.jobspec import build_job
from .backend.ops import AmlOps, run_blocking
from .backend.plan import draft_plan, plan_cluster
from .backend.state import SAME_NAMES, ClusterPlan
from .backend.workspace import workspace_client
from .connect import temporary_tls
from .exceptions import (
    ConfigurationError,
    JobCanceledError,
    JobError,
    JobFailedError,
)

logger = logging.getLogger("dask_amlcompute.jobmode")

#: The parameters of :func:`submit_script` that are cluster settings.
_SETTINGS = frozenset(f.name for f in fields(config.ClusterSettings)) - {"poll_interval"}


@dataclass(frozen=True)
class ScriptRun:
    """The outcome of :func:`submit_script`.

    Attributes
    ----------
    job_name
        The AML job.
    status
        Last status (``Completed`` when waited for and successful).
    exit_code
        The script's exit code, once the job has published it.
    studio_url
        Link to the job in Azure ML studio.
    output
        What the script printed (from rank 0's log, last 2000 lines), when waited for.
    """

    job_name: str
    status: str
    exit_code: int | None = None
    studio_url: str | None = None
    output: str | None = None


def script_output(log: str | None) -> str | None:
    """The script's part of rank 0's log (between the job-mode markers)."""
    if not log or OUTPUT_BEGIN not in log:
        return None
    text = log.split(OUTPUT_BEGIN, 1)[1].lstrip("\n")
    return text.split(OUTPUT_END, 1)[0]


def _script(
    script_path: Any, script_args: Any, code: Any, wait_workers: float, tmp: str
) -> tuple[ScriptOptions, Any]:
    """The script's options and the code folder carrying it (a lone script: copied to ``tmp``)."""
    if not isinstance(script_args, list | tuple) or not all(
        isinstance(a, str) for a in script_args
    ):
        raise ConfigurationError(f"script_args must be a list of strings, got {script_args!r}.")
    for what, path in (("script_path", script_path), ("code", code)):
        if path is not None and not isinstance(path, str | os.PathLike):
            raise ConfigurationError(f"{what} must be a path (str or os.PathLike), got {path!r}.")
    path = Path(script_path)
    if code is None:  # the job's code snapshot carries the lone script
        try:
            shutil.copyfile(path, os.path.join(tmp, path.name))
        except OSError as exc:
            raise ConfigurationError(f"Cannot read script_path {path}: {exc}") from None
        code, path = tmp, Path(path.name)
    elif path.is_absolute():
        try:
            path = path.relative_to(Path(code).resolve())
        except ValueError:
            raise ConfigurationError(
                f"Script {path} is not inside the code folder {code}."
            ) from None
    return ScriptOptions(path.as_posix(), wait_workers, tuple(script_args)), code


def build_script_job(
    script_path: str | os.PathLike,
    *,
    script_args: Sequence[str] = (),
    code: str | os.PathLike | None = None,
    wait_workers: str | float = "5m",
    **settings: Any,
):
    """Build (but do not submit) the AML command job of :func:`submit_script`.

    Takes the arguments of :func:`submit_script`; ``settings`` are resolved
    with the cluster's :func:`~dask_amlcompute.config.resolve_settings` (same
    dask config keys), except ``idle_timeout`` and ``no_client_timeout``. The
    environment and code snapshot are the cluster's draft plan's
    (:func:`~dask_amlcompute.backend.plan.draft_plan`; submitting completes it).

    Returns
    -------
    azure.ai.ml.entities.Command

    Raises
    ------
    ConfigurationError
        An argument or dask config value is invalid.
    """
    _, draft, build = _prepare(script_path, script_args, code, wait_workers, settings)
    return build(draft)


def _prepare(
    script_path: Any, script_args: Any, code: Any, wait_workers: Any, settings: dict[str, Any]
) -> tuple[config.ClusterSettings, ClusterPlan, Callable[[ClusterPlan], Any]]:
    """The settings, the draft plan, and how to build the job from the (completed) plan."""
    # not read from dask config: see submit_script
    idle = config.checked("idle-timeout", settings.pop("idle_timeout", None))
    no_client = config.checked("no-client-timeout", settings.pop("no_client_timeout", None))
    wait_for_workers = config.checked("startup-timeout", wait_workers, "wait_workers")
    # no client: no SSH key, no tunnel; worker jobs are a cluster's; the script's client
    # connects only once the workers are there: its first contact may come that much later
    first_contact = wait_for_workers + no_client if no_client else None
    s = replace(config.resolve_settings(**settings), connect="direct", worker_compute=None,
                idle_timeout=idle, no_client_timeout=no_client, first_contact_timeout=first_contact)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        script, folder = _script(script_path, script_args, code, wait_for_workers, tmp)
        draft = draft_plan(s, folder, "create")

    def build(plan: ClusterPlan) -> Any:
        node = NodeOptions(  # the cluster's node settings: ports, memory, worker options...
            role="cluster", name_prefix=s.name, threads=s.threads_per_process,
            processes=plan.gpus_per_node or s.processes_per_node, cuda=plan.gpus_per_node > 0,
            job_timeout=s.job_timeout, script=script, **{n: getattr(s, n) for n in SAME_NAMES},
        )  # fmt: skip
        file = Path(str(script.script)).name
        job = build_job(
            s, name=s.name, n_nodes=s.n_nodes, node=node, environment=plan.environment,
            code=plan.code, timeout_seconds=s.job_timeout, tags={TAG_MODE: "script",
            "dask_script": file},
            env_vars={**s.env_vars, **temporary_tls(s)[1]},
        )  # fmt: skip
        job.display_name = f"{file} on {s.n_nodes} node(s) (dask-amlcompute run)"
        return job

    return s, draft, build


async def _outcome(ops: Any, info: Any) -> ScriptRun:
    """The :class:`ScriptRun` of an ended job, or its error."""
    if EXIT_CODE_TAG not in info.tags:  # the job resource may not carry the run's tags yet
        info = await ops.with_run_tags(info)
    exit_code = int(code) if (code := info.tags.get(EXIT_CODE_TAG)) else None
    message, files = await ops.run_details(info.name)
    rank0 = {k: v for k, v in files.items() if k.endswith("_0.txt")}
    output = script_output(await ops.log_tail(rank0, lines=2000) if rank0 else None)
    if info.status == "Completed":
        return ScriptRun(info.name, info.status, exit_code, info.studio_url, output)
    tail = "\n".join(output.splitlines()[-40:]) if output else None
    tail = tail or (await ops.log_tail(files) if files else None)
    what = f"exited with code {exit_code}" if exit_code else "did not finish"
    text = f"The script {what}: AML job {info.name} ended {info.status}."
    text += f"\nAML says: {message}" if message else ""
    cls = JobCanceledError if info.status == "Canceled" else JobFailedError
    err = cls(text, job_name=info.name, status=info.status, studio_url=info.studio_url,
              log_tail=tail)  # fmt: skip
    err.exit_code = exit_code
    raise err


async def _submit_and_wait(ops: AmlOps, prepared: tuple, wait: bool, wait_timeout: float | None,
                           poll_interval: float, quiet: bool) -> ScriptRun:  # fmt: skip
    """Complete the cluster's plan (its checks), submit the job and (with ``wait``) wait for it.

    Cancelled (Ctrl-C) once the submission has begun, it cancels the job first:
    a submission still in flight is let land (bounded), then cancelled.
    """

    def log(message: str) -> None:
        logger.info(message)
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    settings, draft, build = prepared
    job = build(await plan_cluster(settings, ops, draft, log))
    limit = wait_timeout or (settings.job_timeout or 3600) + 1800
    deadline = time.monotonic() + limit
    submitting = asyncio.ensure_future(ops.submit(job))
    try:
        info = await asyncio.shield(submitting)
        log(f"Submitted AML job {info.name} ({settings.n_nodes} node(s)): {info.status}")
        if info.studio_url:
            log(f"Studio: {info.studio_url}")
        while wait and not info.terminal:
            if time.monotonic() > deadline:
                raise JobError(
                    f"Gave up waiting after {limit:.0f}s; the job keeps running until it "
                    "ends or reaches its job_timeout.",
                    job_name=info.name, status=info.status, studio_url=info.studio_url,
                )  # fmt: skip
            await asyncio.sleep(poll_interval)
            previous, info = info.status, await ops.get_job(info.name)
            if info.status != previous:
                log(f"AML job {info.name}: {info.status}")
    except (KeyboardInterrupt, asyncio.CancelledError):
        log(f"Interrupted: cancelling AML job {job.name}")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(submitting, 60)
        await ops.cancel(job.name)
        log(f"Cancelled AML job {job.name}")
        raise
    if not wait:
        return ScriptRun(info.name, info.status, studio_url=info.studio_url)
    return await _outcome(ops, info)


def submit_script(
    ml_client: Any, script_path: str | os.PathLike, *, compute: str, n_nodes: int = 1,
    processes_per_node: int | None = None, threads_per_process: int | None = None,
    script_args: Sequence[str] = (), job_timeout: str | float | None = None,
    experiment_name: str | None = None, name: str | None = None, environment: Any = None,
    pip_packages: Sequence[str] | None = None, conda_packages: Sequence[str] | None = None,
    node_package: str | None = None, env_vars: Mapping[str, str] | None = None,
    code: str | os.PathLike | None = None, distribution: str | None = None,
    security: bool | None = None, idle_timeout: str | float | None = None,
    no_client_timeout: str | float | None = None, wait: bool = True,
    wait_timeout: str | float | None = None, wait_workers: str | float = "5m",
    poll_interval: float = 2.0, quiet: bool = False,
) -> ScriptRun:  # fmt: skip
    """Run a Dask script as one AML job on ``n_nodes`` nodes; the job ends with the script.

    Rank 0 runs the scheduler, then the script with ``DASK_SCHEDULER_ADDRESS`` set
    (``Client()`` connects); every rank runs workers. Settings follow the cluster's
    precedence (argument, ``amlcompute.*`` dask config, ``amlcompute.yaml``) but for
    ``idle_timeout`` and ``no_client_timeout``, never read from config (the cluster's
    defaults would stop a script working without a client). Blocks; interrupting it
    cancels the submitted job, then raises.

    Parameters
    ----------
    ml_client
        An ``azure.ai.ml.MLClient`` (``Emulator.ml_client()`` works too).
    script_path, script_args
        The script (relative to ``code`` when given) and its arguments.
    compute, n_nodes, processes_per_node, threads_per_process, job_timeout, \
experiment_name, name, environment, pip_packages, conda_packages, node_package, \
env_vars, distribution, security
        As for :class:`~dask_amlcompute.AmlComputeCluster` (``name``: the job's,
        default ``dask-run-<random>``).
    code
        A folder uploaded as the job's code snapshot (holding the script); without
        it the snapshot carries the script alone.
    idle_timeout, no_client_timeout
        Stop the scheduler (and fail the job) after this long without tasks, or
        without a client once the script had ``wait_workers``. None: no limit.
    wait, wait_timeout, poll_interval
        Wait for the job to end (False: return once submitted), at most ``wait_timeout``
        (default ``job_timeout`` + 30 min), polling every ``poll_interval``.
    wait_workers, quiet
        How long rank 0 waits for all workers before the script; print no progress.

    Returns
    -------
    ScriptRun

    Raises
    ------
    JobFailedError, JobCanceledError
        The script failed (``exit_code``, log tail) or the job was cancelled.
    ConfigurationError
        An argument or dask config value is invalid; nothing was submitted.

    Examples
    --------
    >>> submit_script(ml_client, "score.py", compute="cpu", n_nodes=4).status  # doctest: +SKIP
    'Completed'
    """
    settings = {k: v for k, v in locals().items() if k in _SETTINGS}  # quiet: checked there
    ml_client = workspace_client(ml_client)
    if compute is None:
        raise ConfigurationError("submit_script needs compute='<AmlCompute name>'.")
    config.checked("progress", wait, "wait")  # the schema's boolean
    bound = config.checked("job-timeout", wait_timeout, "wait_timeout")
    poll = config.checked("poll-interval", poll_interval)
    settings["name"] = name or f"dask-run-{uuid.uuid4().hex[:10]}"
    prepared = _prepare(script_path, script_args, code, wait_workers, settings)
    return run_blocking(_submit_and_wait(AmlOps(ml_client), prepared, wait, bound, poll, quiet))
