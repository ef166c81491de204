"""Issue 3 (b): ``client.map`` + gather of no-op tasks, AmlComputeCluster vs LocalCluster.

Subject: a 3-node AmlComputeCluster with the scheduler alone on rank 0 and one
single-threaded worker on each of ranks 1 and 2. Baseline: ``LocalCluster``
with the same 2 worker processes x 1 thread. Both clusters stay up for the
whole suite and runs alternate, so both see the same machine load.
"""

from __future__ import annotations

from common import (
    EmulatorProcess,
    Options,
    Row,
    SuiteResult,
    aml_cluster,
    cluster_kwargs,
    interleave,
    map_rate,
    median,
    pair_ratio,
)
from distributed import Client, LocalCluster

COMPUTE = "bench-cpu"
TARGET = 0.9


def run(opts: Options) -> SuiteResult:
    """Measure no-op task throughput against LocalCluster, interleaved."""
    n = opts.pick(10_000, 2_000)
    reps = opts.pick(3, 2)
    with (
        EmulatorProcess(opts.workdir, [{"name": COMPUTE, "max_nodes": 3}]) as emu,
        aml_cluster(
            emu,
            emu.ml_client(),
            **cluster_kwargs(COMPUTE, n_nodes=3, worker_on_scheduler=False),
        ) as cluster,
        Client(cluster) as aml_client,
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as local,
        Client(local) as local_client,
    ):
        aml_client.wait_for_workers(2, timeout=60)
        local_client.wait_for_workers(2, timeout=60)
        for client in (local_client, aml_client):  # warm-up: imports, connections
            map_rate(client, 500)
        base, subj = interleave(
            lambda: map_rate(local_client, n), lambda: map_rate(aml_client, n), reps, warmup=0
        )
    ratio = pair_ratio(subj, base)
    result = SuiteResult()
    result.rows.append(
        Row(
            "throughput",
            f"client.map+gather {n} no-op tasks, AML cluster / LocalCluster (2 procs x 1 thread)",
            ratio,
            "x",
            target=f">= {TARGET}x",
            met=ratio >= TARGET,
            detail=(
                f"aml median {median(subj):.0f} tasks/s, local median {median(base):.0f} "
                f"tasks/s (n={reps})"
            ),
        )
    )
    return result
