"""The README's demo: a 3-node cluster on the local AML emulator, real workloads.

Through the unmodified azure-ai-ml SDK; dataframe, bag, delayed and ``client.map`` results
are checked against local ones; it exits non-zero on any failure.
"""

from __future__ import annotations

import operator
import time
from typing import Any


def workloads(client) -> list[tuple[str, object, object]]:
    """Run the demo workloads; return (name, result, expected) triples."""
    import dask
    import dask.bag as db
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(42)
    pdf = pd.DataFrame({"key": rng.integers(0, 10, 200_000), "value": rng.normal(size=200_000)})
    got = dd.from_pandas(pdf, npartitions=12).groupby("key")["value"].mean().compute()
    want = pdf.groupby("key")["value"].mean()
    words = db.from_sequence(["alpha beta gamma", "beta gamma", "gamma"] * 1000, npartitions=6)
    parts = [dask.delayed(sum)(range(i * 1000, (i + 1) * 1000)) for i in range(10)]
    squares = client.map(operator.pow, range(1000), [2] * 1000)
    return [
        ("dask.dataframe groupby-mean (10 groups)", bool(np.allclose(got.sort_index(), want)), True),
        ("dask.bag word count", dict(words.map(str.split).flatten().frequencies().compute()),
         {"alpha": 1000, "beta": 2000, "gamma": 3000}),
        ("dask.delayed tree sum", dask.delayed(sum)(parts).compute(), sum(range(10_000))),
        ("client.map 1000 squares", sum(client.gather(squares)), sum(i * i for i in range(1000))),
    ]  # fmt: skip


#: How the demo's client reached the scheduler, by connector mode.
PATH_NAMES = {
    "direct": "directly to the scheduler's address",
    "job-ssh": "through the main job's SSH service and the (emulated) AML WebSocket proxy",
    "ssh": "through the node's public SSH endpoint",
}


def start_emulator(network: str) -> Any:
    """A started emulator with a stock ``cpu-cluster`` (no SSH settings), on ``network``.

    ``"auto"``: ``isolated`` (the nodes in a network namespace the client cannot
    reach, as a laptop outside the compute's VNet) where this machine can create
    network namespaces, else ``loopback``, saying so.
    """
    from aml_emulator import ComputeSpec, Emulator
    from aml_emulator.netns import NetworkNamespaceError

    computes = [
        ComputeSpec(name="cpu-cluster", max_nodes=4, admin_user=None, ssh_public_access=False)
    ]
    if network != "auto":
        return Emulator(computes=computes, network=network).start()
    try:
        return Emulator(computes=computes, network="isolated").start()
    except NetworkNamespaceError as exc:
        print(f"Nodes on this machine's loopback (no isolated network here: {exc})")
        return Emulator(computes=computes, network="loopback").start()


def run_demo(n_nodes: int, processes_per_node: int, quiet: bool, network: str) -> int:
    """Run the demo end to end; return the process exit code (0 = all results correct)."""
    from distributed import Client

    from ..cluster import AmlComputeCluster

    start = time.monotonic()
    failures = 0
    with start_emulator(network) as emu:
        print(
            f"AML emulator at {emu.base_url} (workspace {emu.workspace_name}, "
            f"{emu.config.network} node network)"
        )
        cluster = AmlComputeCluster(
            emu.ml_client(), compute="cpu-cluster", n_nodes=n_nodes, threads_per_process=1,
            processes_per_node=processes_per_node, job_timeout="30m", startup_timeout="3m",
            experiment_name="dask-amlcompute-demo", poll_interval=0.5, quiet=quiet,
        )  # fmt: skip
        with cluster, Client(cluster) as client:
            workers = client.scheduler_info()["workers"]
            phases = cluster.startup_phases.items()  # submitted 0.1s -> Running 0.9s -> ...
            print("Startup: " + " -> ".join(f"{name} {s:.1f}s" for name, s in phases))
            print(f"Connected: {PATH_NAMES[str(cluster._connector.mode)]}")
            print(
                f"Cluster {cluster.name}: {len(workers)} workers, dashboard {cluster.dashboard_link}"
            )
            for name, got, want in workloads(client):
                status = "ok" if got == want else "WRONG"
                failures += status != "ok"
                print(f"  {status:5} {name}: {got}")
            job = cluster.main_job_name
        status = emu.wait_job(job, timeout=60)  # close sent the cancel; AML ends the job after
        print(f"Main job {job}: {status}; nodes in use: {emu.nodes_in_use('cpu-cluster')}")
        if emu.nodes_in_use("cpu-cluster"):
            print("Nodes still in use after close")
            failures += 1
    print(
        f"{'All results correct' if not failures else f'{failures} failure(s)'} in {time.monotonic() - start:.1f}s"
    )
    return 1 if failures else 0
