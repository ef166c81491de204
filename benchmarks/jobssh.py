"""Issue 16: Dask through the main job's SSH service (AML's WebSocket proxy) vs direct.

Two 2-node clusters on the same emulator compute, one with
``connect="job-ssh"`` (client -> local port -> asyncssh channel -> WebSocket
binary frames -> the emulator's proxy -> the node's job SSH daemon ->
scheduler), the path ``connect="auto"`` takes on a stock workspace, and one
with ``connect="direct"``; both clients route data through the scheduler
(``direct_to_workers=False``), as a tunnelled client must. Runs alternate
between the two. The emulator's network is ``loopback`` so that the direct
path exists at all; the job-service path is the same in ``isolated`` mode.
"""

from __future__ import annotations

import os

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
from distributed import Client
from tunnel import round_trip, scatter_gather_rate, with_cpu

COMPUTE = "bench-jobssh"
THROUGHPUT_TARGET = 0.9


def run(opts: Options) -> SuiteResult:
    """Measure task latency, ``client.map`` throughput and scatter/gather, job-ssh vs direct."""
    n_tasks = opts.pick(10_000, 1_000)
    n_latency = opts.pick(200, 100)
    mbytes = opts.pick(100, 20)
    reps = opts.pick(3, 2)
    map_reps = opts.pick(2, 2)
    rows: list[Row] = []
    computes = [{"name": COMPUTE, "max_nodes": 4, "ssh_public_access": False}]
    with (
        EmulatorProcess(opts.workdir, computes, build_environments=False) as emu,
        aml_cluster(
            emu, emu.ml_client(), **cluster_kwargs(COMPUTE, n_nodes=2, connect="direct")
        ) as direct,
        aml_cluster(
            emu, emu.ml_client(), **cluster_kwargs(COMPUTE, n_nodes=2, connect="job-ssh")
        ) as proxied,
        Client(direct, direct_to_workers=False) as dclient,
        Client(proxied, direct_to_workers=False) as jclient,
    ):
        assert proxied._connector.mode == "job-ssh", proxied._connector.mode
        dclient.wait_for_workers(2, timeout=60)
        jclient.wait_for_workers(2, timeout=60)

        d, j = interleave(lambda: round_trip(dclient, n_latency),
                          lambda: round_trip(jclient, n_latency), reps=reps)  # fmt: skip
        rows.append(Row("jobssh", f"task round-trip latency ({n_latency} tiny tasks), job-ssh / "
                        "direct", pair_ratio(j, d), "x", detail=f"job-ssh median "
                        f"{median(j) * 1e3:.1f} ms/task, direct {median(d) * 1e3:.1f} ms/task "
                        f"(n={reps}); lower is better"))  # fmt: skip

        dcpu: list[float] = []
        jcpu: list[float] = []
        map_rate(dclient, 500), map_rate(jclient, 500)  # warm-up
        d, j = interleave(lambda: with_cpu(map_rate, dcpu, dclient, n_tasks),
                          lambda: with_cpu(map_rate, jcpu, jclient, n_tasks), map_reps,
                          warmup=0)  # fmt: skip
        ratio = pair_ratio(j, d)
        rows.append(Row("jobssh", f"client.map {n_tasks} no-op tasks/s, job-ssh / direct", ratio,
                        "x", f">= {THROUGHPUT_TARGET}x", ratio >= THROUGHPUT_TARGET,
                        f"job-ssh median {median(j):.0f} tasks/s, direct {median(d):.0f} tasks/s "
                        f"(n={map_reps}); client-process CPU per 1k tasks: job-ssh "
                        f"{median(jcpu) * 1e3 / n_tasks:.2f} s, direct "
                        f"{median(dcpu) * 1e3 / n_tasks:.2f} s"))  # fmt: skip

        data = os.urandom(mbytes * 10**6)
        d, j = interleave(lambda: scatter_gather_rate(dclient, data),
                          lambda: scatter_gather_rate(jclient, data), reps=reps)  # fmt: skip
        rows.append(Row("jobssh", f"scatter+gather {mbytes} MB, job-ssh / direct (MB/s)",
                        pair_ratio(j, d), "x", detail=f"job-ssh median {median(j):.0f} MB/s, "
                        f"direct {median(d):.0f} MB/s (n={reps}); bytes counted both ways"))  # fmt: skip
    result = SuiteResult(rows=rows)
    result.notes.append(
        "jobssh: the proxy and the job's SSH daemon run in the emulator process on this "
        "machine; on AML the proxy is a regional service across the internet, so absolute "
        "rates there are bounded by the client's link; the ratio isolates the client side "
        "(WebSocket framing, asyncssh, forwarder)."
    )
    return result
