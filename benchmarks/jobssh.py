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
    median,
    pair_ratio,
)
from distributed import Client
from tunnel import cpu_seconds, path_rows, scatter_gather_rate

from dask_amlcompute.connect import proxy

COMPUTE = "bench-jobssh"


def frame_size_row(client: Client, direct: Client, opts: Options, emu_pid: int) -> Row:
    """Scatter+gather with the client's frames at 16 KiB and 64 KiB, and where the CPU goes.

    The library sends at most ``proxy.CHUNK`` (16 KiB) per frame, because larger
    frames are untested against AML's proxy; the emulator's proxy takes any size,
    so the 64 KiB runs (an experiment: the relay reads the constant per batch)
    show what the limit costs. CPU seconds per GB moved are counted for this
    (client) process and the emulator's (its proxy and the job's SSH daemon).
    """
    mbytes, reps = opts.pick(100, 20), opts.pick(3, 2)
    data = os.urandom(mbytes * 10**6)
    gb = 2 * mbytes / 1e3
    rates: dict[str, list[float]] = {"direct": [], "16": [], "64": []}
    cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in rates}
    kept = proxy.CHUNK
    try:
        for rep in range(reps + 1):  # the first round warms up
            for name in ("direct", "16", "64") if rep % 2 else ("64", "16", "direct"):
                proxy.CHUNK = int(name) * 1024 if name != "direct" else kept
                before = cpu_seconds(), cpu_seconds(emu_pid)
                rate = scatter_gather_rate(direct if name == "direct" else client, data)
                if rep:
                    rates[name].append(rate)
                    cpu[name].append(((cpu_seconds() - before[0]) / gb,
                                      (cpu_seconds(emu_pid) - before[1]) / gb))  # fmt: skip
    finally:
        proxy.CHUNK = kept

    def used(name: str) -> str:
        return (f"client {median([c for c, _ in cpu[name]]):.1f}, emulator "
                f"{median([e for _, e in cpu[name]]):.1f}")  # fmt: skip

    return Row("jobssh", f"scatter+gather {mbytes} MB, job-ssh with 64 KiB client frames / "
               "with 16 KiB (MB/s)", pair_ratio(rates["64"], rates["16"]), "x",
               detail=f"experiment (the library sends 16 KiB): 64 KiB {median(rates['64']):.0f} "
               f"MB/s ({pair_ratio(rates['64'], rates['direct']):.2f}x direct), 16 KiB "
               f"{median(rates['16']):.0f} MB/s ({pair_ratio(rates['16'], rates['direct']):.2f}x), "
               f"direct {median(rates['direct']):.0f} MB/s (n={reps}); CPU s/GB: 64 KiB "
               f"{used('64')}; 16 KiB {used('16')}; direct {used('direct')}")  # fmt: skip


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
        rows.append(frame_size_row(jclient, dclient, opts, emu.proc.pid))  # type: ignore[union-attr]
    result = SuiteResult(rows=rows)
    result.notes.append(
        "jobssh: the proxy and the job's SSH daemon run in the emulator process on this "
        "machine; on AML the proxy is a regional service across the internet, so absolute "
        "rates there are bounded by the client's link; the ratio isolates the client side "
        "(WebSocket framing, asyncssh, forwarder)."
    )
    return result
