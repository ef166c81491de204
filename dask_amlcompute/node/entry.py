"""In-job entrypoint: what every node of a dask-amlcompute job runs.

``python -m dask_amlcompute.node --role cluster ...`` is the command of the
cluster's main AML job. Rank 0 starts the Dask scheduler (and, optionally,
workers beside it) and publishes the scheduler's address as an mlflow run tag,
which the client reads back from ``ml_client.jobs.get(name).tags`` (or, when that
copy is late, from the run in run history). Every other
rank starts ``--processes`` worker processes (nannies) that dial the scheduler
on ``MASTER_ADDR``. ``--role workers`` (extra worker jobs) starts workers on
every rank and dials ``--scheduler-address``.

When the scheduler shuts down, every node exits 0, so the AML job completes
and AML releases the nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from .._protocol import DASHBOARD_TAG, SCHEDULER_TAG, VERSIONS_TAG

logger = logging.getLogger("dask_amlcompute.node")


@dataclass(frozen=True)
class NodeContext:
    """Where this process sits in the AML job.

    Attributes
    ----------
    rank
        Node rank (0 runs the scheduler in a cluster job).
    world_size
        Number of nodes (processes, one per node) in the job.
    master_addr
        Address of the rank-0 node.
    node_ip
        This node's own address, the one the scheduler/workers listen on.
    job_name
        The AML job name (``AZUREML_RUN_ID``).
    """

    rank: int
    world_size: int
    master_addr: str
    node_ip: str
    job_name: str


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return int(env[name])
    return None


def _route_ip(target: str) -> str:
    """The local address the kernel would use to reach ``target`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((target, 9))
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def detect_context(env: Mapping[str, str] | None = None) -> NodeContext:
    """Read rank, size and addresses from the variables AML sets in a job.

    PyTorch distribution sets ``NODE_RANK``/``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``;
    MPI distribution sets ``OMPI_COMM_WORLD_RANK``/``SIZE`` and
    ``AZ_BATCHAI_MPI_MASTER_NODE`` (or ``AZ_BATCH_MASTER_NODE`` as ``addr:port``).
    Without either, the job is a single node of rank 0. ``AZ_BATCHAI_NODE_IP``
    gives this node's own address where AML sets it.

    Parameters
    ----------
    env
        The environment to read; ``os.environ`` by default.
    """
    env = os.environ if env is None else env
    rank = _int(env, "NODE_RANK", "OMPI_COMM_WORLD_RANK", "RANK", "PMI_RANK")
    size = _int(env, "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "AZUREML_NODE_COUNT")
    master = env.get("MASTER_ADDR") or env.get("AZ_BATCHAI_MPI_MASTER_NODE")
    if not master and env.get("AZ_BATCH_MASTER_NODE"):
        master = env["AZ_BATCH_MASTER_NODE"].rsplit(":", 1)[0]
    rank = rank or 0
    size = size or 1
    node_ip = env.get("AZ_BATCHAI_NODE_IP") or ""
    if not node_ip:
        node_ip = master if (rank == 0 and master) else _route_ip(master or "127.0.0.1")
    if not master:
        if rank != 0:
            raise RuntimeError(
                "This node has rank > 0 but neither MASTER_ADDR nor AZ_BATCHAI_MPI_MASTER_NODE "
                "is set: submit the job with a PyTorch or MPI distribution."
            )
        master = node_ip
    return NodeContext(
        rank=rank,
        world_size=size,
        master_addr=master,
        node_ip=node_ip,
        job_name=env.get("AZUREML_RUN_ID", "local"),
    )


def package_versions() -> dict[str, str]:
    """Versions of the packages that must match between client and nodes."""
    import cloudpickle
    import dask
    import distributed

    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "cloudpickle": cloudpickle.__version__,
    }


def publish_tags(tags: Mapping[str, str], env: Mapping[str, str] | None = None) -> None:
    """Set run tags on this job's mlflow run, where the client can read them.

    Tags are set one by one in ``tags`` order: put the tag a reader waits for last.

    Uses the mlflow client when installed (on AML, ``azureml-mlflow`` resolves the
    ``azureml://`` tracking URI); otherwise posts the mlflow REST call itself for an
    ``http(s)://`` tracking URI.
    """
    env = os.environ if env is None else env
    run_id = env.get("MLFLOW_RUN_ID") or env.get("AZUREML_RUN_ID")
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not run_id or not uri:
        raise RuntimeError(
            "MLFLOW_TRACKING_URI / MLFLOW_RUN_ID are not set: the scheduler cannot publish its "
            "address. Is this running inside an AML job?"
        )
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        MlflowClient = None
    if MlflowClient is not None:
        client = MlflowClient(tracking_uri=uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return
    if not uri.startswith(("http://", "https://")):
        raise RuntimeError(f"mlflow is not installed and {uri!r} is not an http(s) tracking URI.")
    import requests

    headers = {}
    if env.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
    for key, value in tags.items():
        resp = requests.post(
            uri.rstrip("/") + "/api/2.0/mlflow/runs/set-tag",
            json={"run_id": run_id, "key": key, "value": value},
            headers=headers,
            timeout=30,
        )
        resp.raise_for_status()


#: Environment variables carrying the cluster's TLS certificate and key (PEM) to the nodes.
TLS_CERT_ENV = "DASK_AMLCOMPUTE_TLS_CERT"
TLS_KEY_ENV = "DASK_AMLCOMPUTE_TLS_KEY"


def node_security(env: Mapping[str, str] | None = None):
    """The Dask ``Security`` of this node: TLS when the job carries a certificate, else None."""
    env = os.environ if env is None else env
    cert, key = env.get(TLS_CERT_ENV), env.get(TLS_KEY_ENV)
    if not cert or not key:
        return None
    from distributed.security import Security

    return Security(
        require_encryption=True,
        tls_ca_file=cert,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
        tls_client_cert=cert,
        tls_client_key=key,
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dask_amlcompute.node", description=__doc__)
    p.add_argument("--role", choices=["cluster", "workers"], default="cluster")
    p.add_argument("--name-prefix", required=True, help="worker names are PREFIX-RANK-INDEX")
    p.add_argument("--processes", type=int, default=1, help="worker processes per node")
    p.add_argument("--threads", type=int, default=0, help="threads per worker (0: cores/processes)")
    p.add_argument("--memory-limit", default="auto")
    p.add_argument("--scheduler-port", type=int, default=8786)
    p.add_argument("--dashboard-port", type=int, default=8787)
    p.add_argument("--scheduler-address", default=None, help="for --role workers")
    p.add_argument("--no-worker-on-scheduler", dest="worker_on_scheduler", action="store_false")
    p.add_argument("--death-timeout", type=float, default=300.0)
    p.add_argument("--idle-timeout", type=float, default=None)
    p.add_argument("--no-client-timeout", type=float, default=None)
    p.add_argument(
        "--first-contact-timeout",
        type=float,
        default=None,
        help="seconds the scheduler waits for its first client or heartbeat",
    )
    p.add_argument("--scheduler-options", type=json.loads, default={})
    p.add_argument("--worker-options", type=json.loads, default={})
    return p.parse_args(argv)


def _worker_threads(args: argparse.Namespace) -> int:
    if args.threads > 0:
        return args.threads
    return max(1, (os.cpu_count() or 1) // max(1, args.processes))


async def _start_workers(scheduler_address: str, ctx: NodeContext, args: argparse.Namespace):
    from distributed import Nanny

    security = node_security()
    options = dict(args.worker_options)
    # node-local scratch space in the job's working directory (never shared between nodes)
    options.setdefault("local_directory", os.path.join(os.getcwd(), "dask-scratch-space"))
    if security is not None:
        options.setdefault("security", security)
        options.setdefault("protocol", "tls")
    nannies = [
        Nanny(
            scheduler_address,
            nthreads=_worker_threads(args),
            memory_limit=args.memory_limit,
            name=f"{args.name_prefix}-{ctx.rank}-{i}",
            host=ctx.node_ip,
            death_timeout=args.death_timeout,
            **options,
        )
        for i in range(args.processes)
    ]
    try:
        await asyncio.gather(*nannies)
    except Exception as exc:
        await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, TimeoutError | asyncio.TimeoutError | OSError):
            why = f"could not join the scheduler at {scheduler_address} within {args.death_timeout:.0f}s"
        else:
            why = "failed to start"
        raise RuntimeError(
            f"Workers on node rank {ctx.rank} {why}: {type(root).__name__}: {root}"
        ) from exc
    logger.info("Started %d worker(s) on %s for %s", len(nannies), ctx.node_ip, scheduler_address)
    return nannies


async def _run_scheduler_node(ctx: NodeContext, args: argparse.Namespace, stop: asyncio.Event):
    from distributed import Scheduler

    options = dict(args.scheduler_options)
    if args.idle_timeout:
        options.setdefault("idle_timeout", args.idle_timeout)
    security = node_security()
    if security is not None:
        options.setdefault("protocol", "tls")
    scheduler = Scheduler(
        host=ctx.node_ip,
        port=args.scheduler_port,
        dashboard_address=f"{ctx.node_ip}:{args.dashboard_port}",
        security=security,
        **options,
    )
    await scheduler
    if args.role == "cluster":
        from .plugins import KeepMainJobWorkers

        scheduler.add_plugin(KeepMainJobWorkers(args.name_prefix))
    if args.no_client_timeout:
        from .plugins import NoClientTimeout

        await scheduler.register_scheduler_plugin(
            NoClientTimeout(args.no_client_timeout, args.first_contact_timeout), idempotent=True
        )
    tags = {VERSIONS_TAG: json.dumps(package_versions())}
    if "dashboard" in scheduler.services:
        port = scheduler.services["dashboard"].port
        tags[DASHBOARD_TAG] = f"http://{ctx.node_ip}:{port}/status"
    tags[SCHEDULER_TAG] = scheduler.address  # last: the client reads the others once it sees it
    logger.info("Scheduler at %s; publishing %s", scheduler.address, tags)
    await asyncio.to_thread(publish_tags, tags)
    nannies = []
    if args.worker_on_scheduler:
        nannies = await _start_workers(scheduler.address, ctx, args)
    waiter = asyncio.ensure_future(stop.wait())
    finished = asyncio.ensure_future(scheduler.finished())
    await asyncio.wait([waiter, finished], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    await scheduler.close(reason="node-stopped" if stop.is_set() else "scheduler-finished")
    await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)


async def _run_worker_node(
    scheduler_address: str, ctx: NodeContext, args: argparse.Namespace, stop: asyncio.Event
):
    nannies = await _start_workers(scheduler_address, ctx, args)
    waiter = asyncio.ensure_future(stop.wait())
    done = [asyncio.ensure_future(n.finished()) for n in nannies]
    await asyncio.wait([waiter, *done], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)
    else:
        await asyncio.gather(*done)
    waiter.cancel()


async def run_node(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> None:
    """Run this node's part of the job until the scheduler shuts down."""
    ctx = detect_context(env)
    logger.info("Node context: %s", ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.role == "workers":
        if not args.scheduler_address:
            raise SystemExit("--role workers needs --scheduler-address")
        await _run_worker_node(args.scheduler_address, ctx, args, stop)
    elif ctx.rank == 0:
        await _run_scheduler_node(ctx, args, stop)
    else:
        protocol = "tls" if node_security() is not None else "tcp"
        address = f"{protocol}://{ctx.master_addr}:{args.scheduler_port}"
        await _run_worker_node(address, ctx, args, stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dask_amlcompute.node``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parse_args(argv)
    try:
        asyncio.run(run_node(args))
    except Exception as exc:
        logger.error("dask-amlcompute node failed: %s", exc, exc_info=True)
        print(f"dask-amlcompute node failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
