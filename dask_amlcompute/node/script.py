"""In-job side of job mode: what ``python -m dask_amlcompute.node.script`` runs on each node.

Rank 0 starts the scheduler (:func:`.entry.start_scheduler`) and workers, waits for the
other ranks' workers, runs the script with ``DASK_SCHEDULER_ADDRESS`` (and the job's TLS),
prints its output between :data:`OUTPUT_BEGIN` and :data:`OUTPUT_END`, publishes its exit
code (:data:`EXIT_CODE_TAG`) and exits with it. Other ranks run workers until the scheduler
goes; a scheduler that stops first (idle or no-client timeout) stops the script. The client
side is :mod:`dask_amlcompute.jobmode`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

from .._protocol import (
    EXIT_CODE_TAG,
    OUTPUT_BEGIN,
    OUTPUT_END,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    NodeOptions,
)
from .entry import (
    detect_context,
    main,
    run_node,
    scheduler_tags,
    start_scheduler,
    start_workers,
    stop_on_signals,
)
from .runtags import publish_tags

logger = logging.getLogger("dask_amlcompute.jobmode")


def script_environment(scheduler_address: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The script's environment (from ``env``, default ``os.environ``): the scheduler's address.

    In a TLS job, the certificate and key (PEM text, which distributed takes for a
    path) are named in ``DASK_DISTRIBUTED__COMM__TLS__...``, so ``Client()`` uses them.
    """
    env = dict(os.environ if env is None else env)
    env["DASK_SCHEDULER_ADDRESS"] = scheduler_address
    # The script runs from its own folder, so Python puts that folder first on its path, not
    # the job's working directory: name the folder this package came from (the job's code
    # snapshot, or site-packages when installed) so the script imports the same library.
    library_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (library_root, env.get("PYTHONPATH")) if p)
    cert, key = env.get(TLS_CERT_ENV), env.get(TLS_KEY_ENV)
    if cert and key:
        tls = "DASK_DISTRIBUTED__COMM__TLS__"
        env.update({"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True", tls + "CA_FILE": cert,
                    tls + "CLIENT__CERT": cert, tls + "CLIENT__KEY": key})  # fmt: skip
    return env


async def _wait_for_workers(scheduler: Any, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(scheduler.workers) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    if len(scheduler.workers) < expected:
        logger.warning(
            "Only %d of %d workers joined within %.0fs; starting the script anyway",
            len(scheduler.workers), expected, timeout,
        )  # fmt: skip


async def run_script_node(opts: NodeOptions) -> int:
    """Run this node's part of a job-mode job; returns its exit code (rank 0: the script's)."""
    ctx = detect_context()
    if ctx.rank != 0:
        await run_node(opts)
        return 0
    stop = stop_on_signals()
    scheduler = await start_scheduler(ctx, opts)
    try:
        return await _run_script(scheduler, ctx, opts, stop)
    finally:
        await scheduler.close(reason="script-finished")


async def _run_script(scheduler: Any, ctx: Any, opts: NodeOptions, stop: asyncio.Event) -> int:
    assert opts.script is not None and opts.script.script  # the path in the code snapshot
    script = opts.script.script
    nannies: list = []
    try:
        try:
            await publish_tags(scheduler_tags(scheduler, ctx))
        except Exception as exc:  # the tag only helps to watch the run; the script still runs
            logger.warning("Could not publish the scheduler address: %s", exc)
        if opts.worker_on_scheduler and not (
            nannies := await start_workers(scheduler.address, ctx, opts)
        ):
            raise RuntimeError("The scheduler closed while its node's workers were starting")
        nodes = ctx.world_size if opts.worker_on_scheduler else ctx.world_size - 1
        await _wait_for_workers(scheduler, opts.processes * nodes, opts.script.wait_workers)
        env = script_environment(scheduler.address)
        args = list(opts.script.args)
        logger.info("Running %s %s against %s", script, args, scheduler.address)
        print(OUTPUT_BEGIN, flush=True)
        proc = await asyncio.create_subprocess_exec(sys.executable, script, *args, env=env)
        waiter = asyncio.ensure_future(stop.wait())
        finished = asyncio.ensure_future(scheduler.finished())
        done = asyncio.ensure_future(proc.wait())
        await asyncio.wait([waiter, finished, done], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        finished.cancel()
        if not done.done():
            if stop.is_set():
                logger.warning("Stopping the script (the job is being cancelled)")
            else:  # --idle-timeout or --no-client-timeout: the cluster is gone
                logger.warning("The scheduler stopped before the script ended: stopping the script")
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(done), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await done
        code = done.result() if done.result() >= 0 else 128 - done.result()
        print(f"{OUTPUT_END} {code} -----", flush=True)
        try:
            await publish_tags({EXIT_CODE_TAG: str(code)})
        except Exception as exc:
            logger.warning("Could not publish the exit code: %s", exc)
        return code
    finally:
        await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)


if __name__ == "__main__":
    sys.exit(main(run=run_script_node, doc=__doc__))
