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
    median,
    pair_ratio,
)
from distributed import Client
from tunnel import path_rows, scatter_gather_rate

from dask_amlcompute.connect import proxy

COMPUTE = "bench-jobssh"


def frame_size_row(client: Client, direct: Client, opts: Options, kib: int = 64) -> Row:
    """Scatter+gather again with the client sending ``kib`` KiB frames (an experiment).

    The library sends at most ``proxy.CHUNK`` (16 KiB) per frame, because larger
    frames are untested against AML's proxy; the emulator's proxy takes any size,
    so this row shows what the limit costs. The upstream relay reads the constant
    per batch, so changing it takes effect on the open connection.
    """
    mbytes, reps = opts.pick(100, 20), opts.pick(3, 2)
    data = os.urandom(mbytes * 10**6)
    kept, proxy.CHUNK = proxy.CHUNK, kib * 1024
    try:
        d, p = interleave(lambda: scatter_gather_rate(direct, data),
                          lambda: scatter_gather_rate(client, data), reps=reps)  # fmt: skip
    finally:
        proxy.CHUNK = kept
    return Row("jobssh", f"scatter+gather {mbytes} MB, job-ssh with {kib} KiB client frames "
               "/ direct (MB/s)", pair_ratio(p, d), "x", detail=f"experiment, not what the "
               f"library sends: job-ssh median {median(p):.0f} MB/s, direct {median(d):.0f} "
               f"MB/s (n={reps})")  # fmt: skip


def run(opts: Options) -> SuiteResult:
    """Measure task latency, ``client.map`` throughput and scatter/gather, job-ssh vs direct."""
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

        rows += path_rows("jobssh", "job-ssh", jclient, dclient, opts)
        rows.append(frame_size_row(jclient, dclient, opts))
    result = SuiteResult(rows=rows)
    result.notes.append(
        "jobssh: the proxy and the job's SSH daemon run in the emulator process on this "
        "machine; on AML the proxy is a regional service across the internet, so absolute "
        "rates there are bounded by the client's link; the ratio isolates the client side "
        "(WebSocket framing, asyncssh, forwarder)."
    )
    return result
