"""Job mode: one AML job runs a Dask cluster and your script, and ends with it.

``submit_script(ml_client, "batch.py", compute="cpu-cluster", n_nodes=4)`` (or
``dask-amlcompute run batch.py --nodes 4 --compute cpu-cluster``) submits ONE AML
command job. Rank 0 starts the Dask scheduler (and workers beside it), waits for
the other ranks' workers, then runs the script with ``DASK_SCHEDULER_ADDRESS``
set, so ``Client()`` in the script connects to the in-job cluster. When the
script exits the scheduler shuts down, every node exits and the job ends:
``Completed`` when the script exited 0, else ``Failed`` (rank 0 exits with the
script's exit code, which is also published as the run tag
``dask_script_exit_code``). No notebook or laptop needs to stay open: the batch
lives inside AML, bounded by ``job_timeout`` (the dask-mpi / jobqueue Runner pattern).

The script travels inside the job definition (gzip + base64 in an environment
variable, at most :data:`MAX_EMBEDDED_BYTES`), which works everywhere, including
the local emulator (which has no blob storage for code snapshots). On real AML,
``code="folder"`` uploads the folder as the job's code snapshot instead: use it
for large scripts or scripts that import their own modules.

The in-job side is ``python -m dask_amlcompute.jobmode``: the flags of
:mod:`dask_amlcompute.node` plus ``--script``/``--script-name``/``--wait-workers``,
then ``--`` and the script's own arguments.

This module builds and submits the job (the client side); the in-job side is in
:mod:`dask_amlcompute.node.script` and the ``dask-amlcompute run`` command line in
:mod:`dask_amlcompute.cli.run` (both re-exported here).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import gzip
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._protocol import TAG_MODE, NodeOptions, node_command
from .backend.jobspec import build_job
from .cli.run import run_cli as run_cli
from .exceptions import (
    ConfigurationError,
    JobCanceledError,
    JobError,
    JobFailedError,
    TooManyNodesError,
)
from .node.script import (
    EXIT_CODE_TAG,
    OUTPUT_BEGIN,
    OUTPUT_END,
    SCRIPT_ENV,
    main,
)
from .node.script import run_script_node as run_script_node
from .validation import aml_name, parse_duration, positive_int

logger = logging.getLogger("dask_amlcompute.jobmode")

#: Largest embedded script (after gzip + base64); use ``code=`` beyond it.
MAX_EMBEDDED_BYTES = 64 * 1024


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


def embed_script(source: bytes, name: str = "script") -> str:
    """Compress and encode a script for :data:`SCRIPT_ENV`; refuse one too large.

    Raises
    ------
    ConfigurationError
        The encoded script exceeds :data:`MAX_EMBEDDED_BYTES`.
    """
    encoded = base64.b64encode(gzip.compress(source, mtime=0)).decode("ascii")
    if len(encoded) > MAX_EMBEDDED_BYTES:
        raise ConfigurationError(
            f"Script {name} is {len(source)} bytes ({len(encoded)} encoded): too large to embed "
            f"in the job (limit {MAX_EMBEDDED_BYTES} encoded bytes). Put it in a folder and pass "
            "code='<folder>' (AML uploads it as the job's code snapshot), or move the bulk into "
            "a package installed in the environment."
        )
    return encoded


def build_script_job(
    script_path: str | os.PathLike,
    *,
    name: str,
    compute: str,
    n_nodes: int,
    environment: Any,
    experiment_name: str,
    timeout_seconds: float | None,
    processes_per_node: int = 1,
    threads_per_process: int | None = None,
    script_args: Sequence[str] = (),
    code: str | os.PathLike | None = None,
    env_vars: Mapping[str, str] | None = None,
    distribution: str = "pytorch",
    wait_workers: float = 300.0,
    death_timeout: float = 300.0,
):
    """Build (but do not submit) the AML command job of :func:`submit_script`.

    With ``code``, ``script_path`` is taken relative to that folder and the folder
    becomes the job's code snapshot; otherwise the script is read and embedded.

    Returns
    -------
    azure.ai.ml.entities.Command
    """
    node = NodeOptions(
        role="cluster",
        name_prefix=f"{name}",
        processes=processes_per_node,
        threads=threads_per_process,
        death_timeout=death_timeout,
    )
    env = dict(env_vars or {})
    script_path = Path(script_path)
    extra = ["--script-name", script_path.name, "--wait-workers", f"{wait_workers:g}"]
    if code is not None:
        if script_path.is_absolute():
            try:
                script_path = script_path.relative_to(Path(code).resolve())
            except ValueError:
                raise ConfigurationError(
                    f"Script {script_path} is not inside the code folder {code}."
                ) from None
        extra += ["--script", script_path.as_posix()]
    else:
        env[SCRIPT_ENV] = embed_script(script_path.read_bytes(), str(script_path))
    job = build_job(
        name=name,
        compute=compute,
        n_nodes=n_nodes,
        node=node,
        environment=environment,
        experiment_name=experiment_name,
        timeout_seconds=timeout_seconds,
        cluster_name=name,
        tags={TAG_MODE: "script", "dask_script": script_path.name},
        env_vars=env,
        distribution=distribution,
    )
    argv = shlex.split(node_command(node))
    argv[argv.index("dask_amlcompute.node")] = "dask_amlcompute.node.script"
    job.command = shlex.join([*argv, *extra, "--", *script_args])
    job.display_name = f"{script_path.name} on {n_nodes} node(s) (dask-amlcompute run)"
    if code is not None:
        job.code = str(code)
    return job


async def _submit_and_wait(ops: Any, job: Any, *, n_nodes: int, wait: bool, wait_timeout: float,
                           poll_interval: float, log: Any) -> ScriptRun:  # fmt: skip
    compute = await ops.get_compute(job.compute)
    if compute.max_nodes and n_nodes > compute.max_nodes:
        raise TooManyNodesError(
            f"n_nodes={n_nodes} but compute {compute.name!r} has at most {compute.max_nodes} "
            "node(s) (max_instances); nothing was submitted."
        )
    info = await ops.submit(job)
    log(f"Submitted AML job {info.name} ({n_nodes} node(s)): {info.status}")
    if info.studio_url:
        log(f"Studio: {info.studio_url}")
    if not wait:
        return ScriptRun(info.name, info.status, studio_url=info.studio_url)
    deadline, last = time.monotonic() + wait_timeout, info.status
    try:
        while not info.terminal:
            if time.monotonic() > deadline:
                raise JobError(
                    f"Gave up waiting after {wait_timeout:.0f}s; the job keeps running until it "
                    "ends or reaches its job_timeout.",
                    job_name=info.name, status=info.status, studio_url=info.studio_url,
                )  # fmt: skip
            await asyncio.sleep(poll_interval)
            info = await ops.get_job(info.name)
            if info.status != last:
                log(f"AML job {info.name}: {info.status}")
                last = info.status
    except (KeyboardInterrupt, asyncio.CancelledError):
        log(f"Interrupted: cancelling AML job {info.name}")
        await ops.cancel(info.name)
        raise
    if EXIT_CODE_TAG not in info.tags:  # the job resource may not carry the run's tags yet
        info = await ops.with_run_tags(info)
    code = info.tags.get(EXIT_CODE_TAG)
    exit_code = int(code) if code not in (None, "") else None
    message, files = await ops.run_details(info.name)
    rank0 = {k: v for k, v in files.items() if k.endswith("_0.txt")}
    output = script_output(await ops.log_tail(rank0, lines=2000) if rank0 else None)
    if info.status == "Completed":
        return ScriptRun(info.name, info.status, exit_code, info.studio_url, output)
    tail = "\n".join(output.splitlines()[-40:]) if output else None
    tail = tail or (await ops.log_tail(files) if files else None)
    what = f"exited with code {exit_code}" if exit_code else "did not finish"
    text = f"The script {what}: AML job {info.name} ended {info.status}."
    if message:
        text += f"\nAML says: {message}"
    cls = JobCanceledError if info.status == "Canceled" else JobFailedError
    err = cls(text, job_name=info.name, status=info.status, studio_url=info.studio_url,
              log_tail=tail)  # fmt: skip
    err.exit_code = exit_code  # type: ignore[attr-defined]
    raise err


def submit_script(
    ml_client: Any,
    script_path: str | os.PathLike,
    *,
    compute: str,
    n_nodes: int = 1,
    processes_per_node: int = 1,
    threads_per_process: int | None = None,
    script_args: Sequence[str] = (),
    job_timeout: str | float = "1h",
    experiment_name: str = "dask-amlcompute-run",
    name: str | None = None,
    environment: Any = None,
    env_vars: Mapping[str, str] | None = None,
    code: str | os.PathLike | None = None,
    distribution: str = "pytorch",
    wait: bool = True,
    wait_timeout: str | float | None = None,
    wait_workers: str | float = "5m",
    poll_interval: float = 2.0,
    quiet: bool = False,
) -> ScriptRun:
    """Run a Dask script as one AML job on ``n_nodes`` nodes; the job ends with the script.

    Rank 0 runs the Dask scheduler and then ``python <script> <script_args>`` with
    ``DASK_SCHEDULER_ADDRESS`` set (so ``Client()`` connects); every rank runs
    ``processes_per_node`` workers.

    Parameters
    ----------
    ml_client
        An ``azure.ai.ml.MLClient`` (``Emulator.ml_client()`` works too).
    script_path
        The script; relative to ``code`` when ``code`` is given.
    compute, n_nodes, processes_per_node, threads_per_process
        Where and how wide the in-job cluster is.
    script_args
        Arguments of the script.
    job_timeout
        AML job time limit: AML cancels the job after it.
    experiment_name, name
        Experiment and job name (default ``dask-run-<random>``).
    environment
        As for :class:`~dask_amlcompute.AmlComputeCluster` (default: pinned to this
        client's Python/dask/distributed/cloudpickle versions).
    env_vars
        Extra environment variables of every node (and the script).
    code
        A folder uploaded as the job's code snapshot (real AML). Without it the
        script is embedded in the job (limit :data:`MAX_EMBEDDED_BYTES`).
    distribution
        ``"pytorch"`` or ``"mpi"``.
    wait
        Wait for the job to end; False returns right after submission.
    wait_timeout
        Bound on that wait (default: ``job_timeout`` plus 30 minutes for queueing).
    wait_workers
        How long rank 0 waits for all workers before starting the script anyway.
    poll_interval
        Seconds between status polls.
    quiet
        Do not print progress.

    Returns
    -------
    ScriptRun

    Raises
    ------
    JobFailedError
        The script failed (``exit_code`` attribute, log tail in the message).
    JobCanceledError
        The job was cancelled (``job_timeout`` reached, or by a user).

    Examples
    --------
    >>> run = submit_script(ml_client, "score.py", compute="cpu-cluster", n_nodes=4,
    ...                     job_timeout="3h")  # doctest: +SKIP
    >>> run.status  # doctest: +SKIP
    'Completed'
    """
    from .backend.environment import resolve_environment
    from .backend.ops import AmlOps

    n_nodes = positive_int(n_nodes, "n_nodes")
    timeout = parse_duration(job_timeout, "job_timeout")
    name = aml_name(name or f"dask-run-{uuid.uuid4().hex[:10]}", "job name")
    job = build_script_job(
        script_path,
        name=name,
        compute=compute,
        n_nodes=n_nodes,
        environment=resolve_environment(environment),
        experiment_name=aml_name(experiment_name, "experiment_name"),
        timeout_seconds=timeout,
        processes_per_node=positive_int(processes_per_node, "processes_per_node"),
        threads_per_process=threads_per_process,
        script_args=[str(a) for a in script_args],
        code=code,
        env_vars=env_vars,
        distribution=distribution,
        wait_workers=parse_duration(wait_workers, "wait_workers") or 300.0,
    )
    bound = parse_duration(wait_timeout, "wait_timeout") or (timeout or 3600) + 1800

    def log(message: str) -> None:
        logger.info(message)
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    coro = _submit_and_wait(AmlOps(ml_client), job, n_nodes=n_nodes, wait=wait,
                            wait_timeout=bound, poll_interval=poll_interval, log=log)  # fmt: skip
    # A thread of its own: works whether or not the caller already runs an event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


if __name__ == "__main__":
    sys.exit(main())
