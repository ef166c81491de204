"""Cluster management commands: ``dask-amlcompute list | logs NAME | down NAME``.

They work on real AML (workspace from ``config.json`` and ``DefaultAzureCredential``)
and on the emulator (``--emulator URL``, as printed by ``aml-emulator``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
from datetime import datetime, timezone
from typing import Any

from ..backend.capacity import find_size, size_from_sdk
from ..backend.ops import TERMINAL_STATUSES, AmlOps
from ..config import schema
from ..discovery import ClusterJob, list_cluster_jobs_async


def count(text: str) -> int:
    """The argparse type of node, process and line counts: a whole number from 1 to 4000."""
    value, most = int(text), schema()["n-nodes"]["maximum"]
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"must be from 1 to {most}, got {value}")
    return value


def add_arguments(sub: Any, workspace: argparse.ArgumentParser) -> None:
    """Register ``list``, ``logs`` and ``down`` on argparse subparsers (``workspace``: a parent)."""
    add = functools.partial(sub.add_parser, parents=[workspace])
    add("list", help="list the dask-amlcompute clusters running in the workspace").add_argument(
        "--all", action="store_true", help="include ended clusters"
    )
    logs = add("logs", help="print the node logs of a cluster's jobs")
    logs.add_argument("name", help="cluster name")
    logs.add_argument("--lines", type=count, default=100)
    down = add("down", help="stop a cluster: cancel all of its AML jobs")
    which = down.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="cluster name")
    which.add_argument("--all-mine", action="store_true", help="every cluster you started")


def ml_client_for(args: argparse.Namespace) -> Any:
    """The MLClient the command line should use."""
    if args.emulator:
        from aml_emulator import make_ml_client

        return make_ml_client(args.emulator)
    from ..backend.workspace import ml_client_from_config

    return ml_client_from_config(args.workspace_config)


async def _node_prices(ops: AmlOps, computes: set[str]) -> dict[str, float | None]:
    """Estimated hourly price of one node of each compute (None: unknown)."""
    try:
        sizes = [size_from_sdk(s) for s in await ops.list_sizes()]
    except Exception:  # prices only inform the listing
        sizes = []
    names = sorted(computes)
    found = await asyncio.gather(*map(ops.get_compute, names), return_exceptions=True)
    prices: dict[str, float | None] = dict.fromkeys(names)
    for name, compute in zip(names, found, strict=True):
        if not isinstance(compute, BaseException) and (size := find_size(sizes, compute.vm_size)):
            prices[name] = size.hourly_price(compute.tier)
    return prices


def _hours(now: datetime, since: datetime | None) -> float:
    return 0.0 if since is None else max(0.0, (now - since).total_seconds() / 3600)


def _money(value: float | None) -> str:
    return "?" if value is None else f"${value:,.2f}"


def run_list(args: argparse.Namespace) -> int:
    """``dask-amlcompute list``: clusters, their nodes and what they cost (estimate)."""
    ops = AmlOps(ml_client_for(args))
    jobs = asyncio.run(list_cluster_jobs_async(ops, include_ended=args.all))
    clusters: dict[str, list[ClusterJob]] = {}
    for job in jobs:
        clusters.setdefault(job.cluster, []).append(job)
    if not clusters:
        print("No dask-amlcompute clusters" + ("" if args.all else " running") + ".")
        return 0
    prices = asyncio.run(_node_prices(ops, {j.compute for j in jobs if j.compute}))
    now = datetime.now(timezone.utc)
    print(
        f"{'CLUSTER':30} {'KIND':7} {'COMPUTE':16} {'NODES':>5} {'JOBS':>4} "
        f"{'PRICE/H':>9} {'SO FAR':>9}  STATUS"
    )
    for name, cjobs in sorted(clusters.items()):
        main = next((j for j in cjobs if j.role == "cluster"), cjobs[0])
        active = [j for j in cjobs if j.status not in TERMINAL_STATUSES]
        nodes = sum(j.n_nodes for j in active)
        rates = [(price, j) for j in active if (price := prices.get(j.compute or "")) is not None]
        known = len(rates) == len(active)  # else the sums are unknown
        hourly = sum(p * j.n_nodes for p, j in rates) if known else None
        so_far = sum(p * j.n_nodes * _hours(now, j.created_at) for p, j in rates) if known else None
        print(
            f"{name:30} {main.kind:7} {main.compute or '?':16} {nodes:>5} {len(cjobs):>4} "
            f"{_money(hourly):>9} {_money(so_far):>9}  {main.status}"
        )
    print(
        "PRICE/H: estimated list price of the active jobs' nodes; SO FAR: since each job was "
        "submitted (an upper bound: queued time included; '?' where AML gives no price)."
    )
    return 0


def run_logs(args: argparse.Namespace) -> int:
    """``dask-amlcompute logs NAME``."""
    ops = AmlOps(ml_client_for(args))

    async def show() -> int:
        jobs = await list_cluster_jobs_async(ops, include_ended=True, cluster=args.name)
        if not jobs:
            print(f"No jobs for cluster {args.name!r}.")
            return 1
        for job in sorted(jobs, key=lambda j: j.name):
            message, files = await ops.run_details(job.name)
            print(f"=== {job.name} ({job.status}) ===")
            if message:
                print(f"AML error: {message}")
            print(await ops.log_tail(files, lines=args.lines) or "(no logs)")
        return 0

    return asyncio.run(show())


def run_down(args: argparse.Namespace) -> int:
    """``dask-amlcompute down NAME`` / ``--all-mine``."""
    ops = AmlOps(ml_client_for(args))

    async def down() -> int:
        if args.all_mine:
            me = getpass.getuser()
            targets = [j for j in await list_cluster_jobs_async(ops) if j.user == me]
        else:
            targets = await list_cluster_jobs_async(ops, cluster=args.name)
        if not targets:
            print("Nothing to stop.")
            return 0
        # worker jobs first, then the main jobs (schedulers)
        for job in sorted(targets, key=lambda j: j.role == "cluster"):
            await ops.cancel(job.name)
            print(f"Cancelled {job.name} ({job.cluster})")
        return 0

    return asyncio.run(down())


COMMANDS = {"list": run_list, "logs": run_logs, "down": run_down}


#: Name ``dask-amlcompute env build`` registers the default environment under.
DEFAULT_ENVIRONMENT_NAME = "dask-amlcompute-node"


def register_environment(args: argparse.Namespace, spec: Any) -> int:
    """``dask-amlcompute env build``: register the node environment under a name.

    Its version is the content hash: the same content again is a no-op, a changed one
    (new dask, new Python) a new version.
    """
    ops = AmlOps(ml_client_for(args))
    entity = spec.to_environment(name=args.name or DEFAULT_ENVIRONMENT_NAME)
    registered = asyncio.run(ops.register_environment(entity))
    print(f"Registered AML environment {registered}.")
    print(
        f"Use it with AmlComputeCluster(..., environment={registered!r}), or set it once:\n"
        f"    dask config: amlcompute.environment: {registered}\n"
        f"    environment variable: DASK_AMLCOMPUTE__ENVIRONMENT={registered}\n"
        "AML builds its image the first time a job uses it (5-20 minutes); later clusters "
        "reuse the image. Register again after upgrading Python, dask, distributed or "
        "cloudpickle (the version follows the content)."
    )
    return 0
