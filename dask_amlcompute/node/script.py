"""In-job side of job mode: what ``python -m dask_amlcompute.jobmode`` runs on each node.

Rank 0 starts the Dask scheduler (and workers beside it), waits for the other
ranks' workers, runs the script with ``DASK_SCHEDULER_ADDRESS`` set, prints its
output between :data:`OUTPUT_BEGIN` and :data:`OUTPUT_END`, publishes its exit
code as the run tag :data:`EXIT_CODE_TAG` and exits with it; the other ranks run
workers (:func:`dask_amlcompute.node.entry.run_node`) until the scheduler goes away.
The client side that builds and submits the job is :mod:`dask_amlcompute.jobmode`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .entry import (
    SCHEDULER_TAG,
    VERSIONS_TAG,
    _parse_args,
    _start_workers,
    detect_context,
    package_versions,
    publish_tags,
    run_node,
)

logger = logging.getLogger("dask_amlcompute.jobmode")

#: Environment variables carrying an embedded script into the job.
SCRIPT_ENV = "DASK_AMLCOMPUTE_SCRIPT_GZ_B64"
#: Run tag rank 0 sets to the script's exit code before the job ends.
EXIT_CODE_TAG = "dask_script_exit_code"
#: Lines rank 0 prints around the script's output in its log.
OUTPUT_BEGIN = "----- dask-amlcompute: script output -----"
OUTPUT_END = "----- dask-amlcompute: script exited with code"


def _script_file(args: argparse.Namespace) -> str:
    if args.script:
        return args.script
    encoded = os.environ.get(SCRIPT_ENV)
    if not encoded:
        raise SystemExit(f"No --script and no {SCRIPT_ENV}: nothing to run.")
    folder = tempfile.mkdtemp(prefix="dask-amlcompute-script-")
    path = os.path.join(folder, args.script_name)
    Path(path).write_bytes(gzip.decompress(base64.b64decode(encoded)))
    return path


async def _wait_for_workers(scheduler: Any, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(scheduler.workers) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    if len(scheduler.workers) < expected:
        logger.warning(
            "Only %d of %d workers joined within %.0fs; starting the script anyway",
            len(scheduler.workers), expected, timeout,
        )  # fmt: skip


async def run_script_node(args: argparse.Namespace, node_args: argparse.Namespace,
                          script_args: list[str]) -> int:  # fmt: skip
    """Rank 0 of a job-mode job: scheduler, workers, then the script; returns its exit code."""
    from distributed import Scheduler

    ctx = detect_context()
    if ctx.rank != 0:
        await run_node(node_args)
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    script = _script_file(args)
    scheduler = Scheduler(
        host=ctx.node_ip,
        port=node_args.scheduler_port,
        dashboard_address=f"{ctx.node_ip}:{node_args.dashboard_port}",
        **node_args.scheduler_options,
    )
    await scheduler
    nannies: list = []
    try:
        tags = {SCHEDULER_TAG: scheduler.address, VERSIONS_TAG: json.dumps(package_versions())}
        try:
            await asyncio.to_thread(publish_tags, tags)
        except Exception as exc:  # the tag only helps to watch the run; the script still runs
            logger.warning("Could not publish the scheduler address: %s", exc)
        if node_args.worker_on_scheduler:
            nannies = await _start_workers(scheduler.address, ctx, node_args)
        per_node = node_args.processes
        nodes = ctx.world_size if node_args.worker_on_scheduler else ctx.world_size - 1
        await _wait_for_workers(scheduler, per_node * nodes, args.wait_workers)
        env = {**os.environ, "DASK_SCHEDULER_ADDRESS": scheduler.address}
        logger.info("Running %s %s against %s", script, script_args, scheduler.address)
        print(OUTPUT_BEGIN, flush=True)
        proc = await asyncio.create_subprocess_exec(sys.executable, script, *script_args, env=env)
        waiter = asyncio.ensure_future(stop.wait())
        done = asyncio.ensure_future(proc.wait())
        await asyncio.wait([waiter, done], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not done.done():
            logger.warning("Stopping the script (the job is being cancelled)")
            proc.terminate()
            try:
                await asyncio.wait_for(done, 10)
            except asyncio.TimeoutError:
                proc.kill()
                await done
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        print(f"{OUTPUT_END} {code} -----", flush=True)
        try:
            await asyncio.to_thread(publish_tags, {EXIT_CODE_TAG: str(code)})
        except Exception as exc:
            logger.warning("Could not publish the exit code: %s", exc)
        return code
    finally:
        await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)
        await scheduler.close(reason="script-finished")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dask_amlcompute.jobmode``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    own = argparse.ArgumentParser(prog="python -m dask_amlcompute.jobmode", add_help=False)
    own.add_argument("--script", default=None, help="script path (code snapshot)")
    own.add_argument("--script-name", default="script.py")
    own.add_argument("--wait-workers", type=float, default=300.0)
    args, rest = own.parse_known_args(argv[:cut])
    node_args = _parse_args(rest)
    try:
        return asyncio.run(run_script_node(args, node_args, argv[cut + 1 :]))
    except Exception as exc:
        logger.error("dask-amlcompute job mode failed: %s", exc, exc_info=True)
        print(f"dask-amlcompute job mode failed: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
