"""In-job entrypoint: what every node of a dask-amlcompute job runs.

``python -m dask_amlcompute.node --role cluster`` runs a cluster's main job: rank 0
starts the Dask scheduler (and optionally workers beside it) and publishes its
address as an mlflow run tag, which the client reads from the job (or its run);
every other rank starts ``--processes`` workers (nannies) dialling ``MASTER_ADDR``.
``--role workers`` (extra worker jobs) starts workers on every rank, dialling
``--scheduler-address``. When the scheduler shuts down, every node exits 0: the AML
job completes and AML releases the nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from distributed import Nanny, Scheduler
from distributed.core import Status
from distributed.security import Security
from distributed.utils import get_ip

from .._protocol import (
    DASHBOARD_TAG,
    OPEN,
    SCHEDULER_ID_TAG,
    SCHEDULER_TAG,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    NodeOptions,
    probe,
)
from .plugins import (
    HEARTBEAT_HANDLER,
    KeepMainJobWorkers,
    MissingModules,
    NameTheStop,
    NoClientTimeout,
    exception_chain,
    heartbeat,
)
from .runtags import publish_tags

logger = logging.getLogger("dask_amlcompute.node")
#: When this node process started (AML counts job_timeout from about then).
STARTED = time.monotonic()


@dataclass(frozen=True)
class NodeContext:
    """Where this process sits in the AML job (rank 0 runs the scheduler).

    ``node_ip`` is this node's address, where its servers listen.
    """

    rank: int
    world_size: int
    master_addr: str
    node_ip: str
    job_name: str


def _int(env: Mapping[str, str], *names: str) -> int | None:
    return next((int(env[name]) for name in names if env.get(name, "").strip()), None)


def _host_ip() -> str:
    """The host's own IPv4 address by its name (a lookup, nothing dialled), non-loopback first."""
    try:
        found = [a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        return ""
    return next((str(a) for a in found if not _loopback(str(a))), str(found[0]) if found else "")


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address.lower() == "localhost"


def detect_context(env: Mapping[str, str] | None = None) -> NodeContext:
    """Read rank, size and addresses from the variables AML sets in a job.

    PyTorch distribution: ``NODE_RANK``/``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``; MPI:
    ``OMPI_COMM_WORLD_RANK``/``SIZE``, ``AZ_BATCHAI_MPI_MASTER_NODE`` (or ``AZ_BATCH_MASTER_NODE``
    as ``addr:port``); neither: one node of rank 0. This node's address (``AZ_BATCHAI_NODE_IP``
    first where set): ``MASTER_ADDR`` on rank 0, else the local address routed to the master,
    else the host name's; loopback only when the master's is (the emulator's nodes share one).

    Raises
    ------
    RuntimeError
        Rank > 0 without a master, or no address others can reach.
    """
    env = os.environ if env is None else env
    rank = _int(env, "NODE_RANK", "OMPI_COMM_WORLD_RANK", "RANK", "PMI_RANK") or 0
    size = _int(env, "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "AZUREML_NODE_COUNT") or 1
    master = env.get("MASTER_ADDR") or env.get("AZ_BATCHAI_MPI_MASTER_NODE")
    if not master and env.get("AZ_BATCH_MASTER_NODE"):
        master = env["AZ_BATCH_MASTER_NODE"].rsplit(":", 1)[0]
    if rank != 0 and not master:
        raise RuntimeError(
            "This node has rank > 0 but neither MASTER_ADDR nor AZ_BATCHAI_MPI_MASTER_NODE "
            "is set: submit the job with a PyTorch or MPI distribution."
        )
    node_ip = env.get("AZ_BATCHAI_NODE_IP") or ""
    if not node_ip:
        node_ip = (master if rank == 0 else get_ip(master, 9)) if master else _host_ip()
        if not node_ip or (_loopback(node_ip) and not (master and _loopback(master))):
            raise RuntimeError(
                f"This node found no address other machines can reach (got {node_ip or 'none'}"
                f" from {'the route to ' + master if master else 'its host name'}): a Dask "
                "scheduler or worker on a loopback address is out of everyone else's reach."
            )
    return NodeContext(
        rank=rank,
        world_size=size,
        master_addr=master or node_ip,
        node_ip=node_ip,
        job_name=env.get("AZUREML_RUN_ID", "local"),
    )


def node_security():
    """The Dask ``Security`` of this node: TLS when the job carries a certificate, else None."""
    cert, key = os.environ.get(TLS_CERT_ENV), os.environ.get(TLS_KEY_ENV)
    if not cert or not key:
        return None
    pem = {
        f"tls_{r}_{k}": v
        for r in ("scheduler", "worker", "client")
        for k, v in (("cert", cert), ("key", key))
    }
    return Security(require_encryption=True, tls_ca_file=cert, **pem)


async def start_scheduler(ctx: NodeContext, opts: NodeOptions) -> Any:
    """Start this node's Dask scheduler (cluster and job-mode jobs) on ``ctx.node_ip``.

    With the cluster's TLS, ``--idle-timeout``, ``--scheduler-options``, the
    plugins of :mod:`.plugins` and their :data:`HEARTBEAT_HANDLER`.
    """
    options = dict(opts.scheduler_options)
    if opts.idle_timeout:
        options.setdefault("idle_timeout", opts.idle_timeout)
    security = node_security()
    if security is not None:
        options.setdefault("protocol", "tls")
    scheduler = Scheduler(
        host=ctx.node_ip,
        port=opts.scheduler_port,
        dashboard_address=f"{ctx.node_ip}:{opts.dashboard_port}",
        security=security,
        **options,
    )
    await scheduler
    scheduler.handlers[HEARTBEAT_HANDLER] = lambda: heartbeat(scheduler)
    plugins: list = []
    if opts.role == "cluster":
        plugins += [KeepMainJobWorkers(opts.name_prefix), MissingModules(),
                    NameTheStop(opts.name_prefix, opts.job_timeout)]  # fmt: skip
    if opts.no_client_timeout:
        plugins.append(NoClientTimeout(opts.no_client_timeout, opts.first_contact_timeout))
    for plugin in plugins:
        await scheduler.register_scheduler_plugin(plugin, idempotent=True)
    return scheduler


def scheduler_tags(scheduler: Any, ctx: NodeContext) -> dict[str, str]:
    """The run tags that tell the client where the scheduler is, in publishing order.

    :data:`SCHEDULER_ID_TAG` first: a job AML runs again (preempted) replaces the id before
    the address, never pairing a new id with a stale address. :data:`SCHEDULER_TAG` last:
    the client reads the others once it sees it.
    """
    tags = {SCHEDULER_ID_TAG: scheduler.id}
    if "dashboard" in scheduler.services:
        port = scheduler.services["dashboard"].port
        tags[DASHBOARD_TAG] = f"http://{ctx.node_ip}:{port}/status"
    tags[SCHEDULER_TAG] = scheduler.address
    return tags


def worker_options(opts: NodeOptions) -> dict[str, Any]:
    """Keyword arguments of every worker this node starts (CPU nannies and dask-cuda).

    ``--worker-options``, node-local scratch space (the job's working directory), the TLS.
    """
    options = dict(opts.worker_options)
    options.setdefault("local_directory", os.path.join(os.getcwd(), "dask-scratch-space"))
    security = node_security()
    if security is not None:
        options.setdefault("security", security)
        options.setdefault("protocol", "tls")
    return options


async def start_workers(scheduler_address: str, ctx: NodeContext, opts: NodeOptions) -> list:
    """Start ``opts.processes`` workers (nannies) ``PREFIX-RANK-INDEX`` for ``scheduler_address``.

    Returns
    -------
    list of distributed.Nanny
        The running nannies; none when the scheduler closed while they joined
        (a joined worker ended, or it no longer listens): a normal end.

    Raises
    ------
    RuntimeError
        The workers failed to start or to join a scheduler still listening
        (every nanny started is closed first).
    """
    if opts.cuda:
        return await start_cuda_workers(scheduler_address, ctx, opts)
    options = worker_options(opts)
    nannies = [
        Nanny(
            scheduler_address,
            nthreads=opts.threads or max(1, (os.cpu_count() or 1) // max(1, opts.processes)),
            memory_limit=opts.memory_limit,
            name=f"{opts.name_prefix}-{ctx.rank}-{i}",
            host=ctx.node_ip,
            death_timeout=opts.death_timeout,
            **options,
        )
        for i in range(opts.processes)
    ]
    outcome: BaseException | bool = False
    try:
        outcome = await _join(nannies)
    finally:  # failed, a worker ended, or the node is stopping: leave no worker behind
        if outcome is not True:
            await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)
    if outcome is True:
        logger.info(
            "Started %d worker(s) on %s for %s", len(nannies), ctx.node_ip, scheduler_address
        )
        return nannies
    # a joined worker ended, or joining failed and the scheduler no longer listens: it closed
    if outcome is False or await probe(scheduler_address, 1.0) != OPEN:
        logger.info("The scheduler at %s closed while the workers on node rank %d were joining "
                    "it: nothing left to do", scheduler_address, ctx.rank)  # fmt: skip
        return []
    root = exception_chain(outcome)[-1]  # "Nanny failed to start" wraps the worker's error
    raise RuntimeError(
        f"Workers on node rank {ctx.rank} failed to start or to join the scheduler at "
        f"{scheduler_address}: {type(root).__name__}: {root}"
    ) from outcome


async def start_cuda_workers(scheduler_address: str, ctx: NodeContext, opts: NodeOptions) -> list:
    """Start dask-cuda workers ``PREFIX-RANK-INDEX``: one per GPU, each with ``resources={"GPU": 1}``.

    ``dask_cuda.CUDAWorker`` starts one nanny per visible GPU; returns them.
    """
    try:
        from dask_cuda import CUDAWorker
    except ImportError as exc:
        raise RuntimeError(
            "--cuda needs dask-cuda in the node environment (the default environment adds it "
            f"on GPU sizes): {exc}"
        ) from exc
    options = worker_options(opts)
    resources = {"GPU": 1, **dict(options.pop("resources", None) or {})}
    worker = CUDAWorker(
        scheduler_address,
        host=ctx.node_ip,
        nthreads=opts.threads or 1,
        name=f"{opts.name_prefix}-{ctx.rank}",
        resources=resources,
        death_timeout=opts.death_timeout,
        **options,
    )
    await worker
    logger.info("Started %d dask-cuda worker(s) on %s", len(worker.nannies), ctx.node_ip)
    return list(worker.nannies)


async def _join(nannies: list) -> BaseException | bool:
    """Start ``nannies``: True when all joined, the first error, or False when a joined one ended.

    A joined worker ending means its scheduler closed: the others would wait out their death timeout.
    """
    starting = {asyncio.ensure_future(n.start()): n for n in nannies}
    ended: set[asyncio.Future] = set()
    try:
        while starting:
            done, _ = await asyncio.wait([*starting, *ended], return_when=asyncio.FIRST_COMPLETED)
            if done & ended:
                return False
            for task in done:
                if (error := task.exception()) is not None:
                    return error
                ended.add(asyncio.ensure_future(starting.pop(task).finished()))
        return True
    finally:
        for task in [*starting, *ended]:
            task.cancel()


def stop_on_signals() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT (AML cancelling the job), in the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_scheduler_node(ctx: NodeContext, opts: NodeOptions, stop: asyncio.Event):
    scheduler = await start_scheduler(ctx, opts)
    tags = scheduler_tags(scheduler, ctx)
    logger.info("Scheduler at %s; publishing %s", scheduler.address, tags)
    await publish_tags(tags)
    nannies = []
    if opts.worker_on_scheduler:
        try:
            nannies = await start_workers(scheduler.address, ctx, opts)
        except RuntimeError:
            # the cluster closing while they start (e.g. refused versions) is a normal end
            if scheduler.status not in (Status.closing, Status.closed) and not stop.is_set():
                raise
            logger.info("The scheduler closed while its node's workers were starting")
    waiter = asyncio.ensure_future(stop.wait())
    finished = asyncio.ensure_future(scheduler.finished())
    await asyncio.wait([waiter, finished], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    naming = scheduler.plugins.get(NameTheStop.name)
    if stop.is_set() and naming and naming.fail_work(scheduler, ctx.job_name, STARTED):
        await asyncio.sleep(0.5)  # the client comms send the errors before they close
    await scheduler.close(reason="node-stopped" if stop.is_set() else "scheduler-finished")
    await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)


async def _start_when_listening(
    address: str, ctx: NodeContext, opts: NodeOptions, stop: asyncio.Event
) -> list:
    """:func:`start_workers` once ``address`` listens (polled every 50-250 ms, death timeout)."""
    # a nanny dials with Dask's exponential back-off: seconds late after a slow scheduler start
    deadline, pause = time.monotonic() + opts.death_timeout, 0.05
    while not stop.is_set() and await probe(address, 1.0) != OPEN:  # 3.10 can lose a cancel
        if time.monotonic() > deadline:
            why = f"could not join the scheduler at {address} within {opts.death_timeout:.0f}s"
            raise RuntimeError(f"Workers on node rank {ctx.rank} {why}")
        await asyncio.sleep(pause)
        pause = min(pause * 1.25, 0.25)  # a probe is ~0.5 ms of CPU, on cores a scheduler may share
    return [] if stop.is_set() else await start_workers(address, ctx, opts)


async def _run_worker_node(address: str, ctx: NodeContext, opts: NodeOptions, stop: asyncio.Event):
    starting = asyncio.ensure_future(_start_when_listening(address, ctx, opts, stop))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # AML is cancelling the job while the workers still join
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
    if stop.is_set() and (starting.cancelled() or starting.exception() or not starting.result()):
        logger.info("Stopped while the workers were joining the scheduler")
        return
    stopped.cancel()
    nannies = starting.result()  # none: the scheduler closed while they joined
    # until AML stops the job or a nanny stops running (the closing scheduler told it to, or
    # it lost the scheduler); then close them all: a worker left to exit by itself lingers 2 s
    while nannies and not stop.is_set() and all(n.status == Status.running for n in nannies):
        await asyncio.sleep(0.1)
    await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)


async def run_node(opts: NodeOptions, env: Mapping[str, str] | None = None) -> None:
    """Run this node's part of the job until the scheduler shuts down."""
    ctx = detect_context(env)
    stop = stop_on_signals()  # before the log line: from it on, SIGTERM stops the node cleanly
    logger.info("Node context: %s", ctx)
    if opts.role == "workers":
        if not opts.scheduler_address:
            raise SystemExit("--role workers needs --scheduler-address")
        await _run_worker_node(opts.scheduler_address, ctx, opts, stop)
    elif ctx.rank == 0:
        await _run_scheduler_node(ctx, opts, stop)
    else:  # rank 0's scheduler, on --scheduler-port
        protocol = "tls" if node_security() is not None else "tcp"
        address = f"{protocol}://{ctx.master_addr}:{opts.scheduler_port}"
        await _run_worker_node(address, ctx, opts, stop)


def main(
    argv: list[str] | None = None, run: Callable[..., Any] | None = None, doc: str | None = __doc__
) -> int:
    """``python -m dask_amlcompute.node`` (job mode's ``.node.script``: ``run``); the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    opts = NodeOptions.from_argv(argv, script=run is not None, description=doc)
    try:
        return asyncio.run((run or run_node)(opts)) or 0
    except Exception as exc:
        logger.error("dask-amlcompute node failed: %s", exc, exc_info=True)
        print(f"dask-amlcompute node failed: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
