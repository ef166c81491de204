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
    tree_cpu_seconds,
)
from distributed import Client
from tunnel import cpu_seconds, path_rows, scatter_gather_rate

from dask_amlcompute.connect import proxy

COMPUTE = "bench-jobssh"


def frame_size_rows(client: Client, direct: Client, opts: Options, emu_pid: int) -> list[Row]:
    """Scatter+gather: 16 vs 64 KiB client frames, without ``tokenize``, and where the CPU goes.

    The library sends at most ``proxy.CHUNK`` (16 KiB) per frame, because larger
    frames are untested against AML's proxy; the emulator's proxy takes any size,
    so the 64 KiB runs (an experiment: the relay reads the constant per batch)
    show what the limit costs. ``scatter(hash=False)`` leaves out ``dask.tokenize``
    of the data, which costs both paths the same: what remains is the transfer.
    CPU seconds per GB moved are counted for this (client) process, the emulator's
    (the AML side: its proxy and the job's SSH daemon) and the nodes' (schedulers
    and workers), with the cores they kept busy: all share this machine's cores.
    """
    mbytes, reps = opts.pick(100, 20), opts.pick(3, 2)
    data = os.urandom(mbytes * 10**6)
    gb = 2 * mbytes / 1e3
    runs = {"direct": (direct, True), "16": (client, True), "64": (client, True),
            "direct-nohash": (direct, False), "16-nohash": (client, False)}  # fmt: skip
    rates: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[tuple[float, ...]]] = {k: [] for k in runs}
    kept = proxy.CHUNK
    try:
        for rep in range(reps + 1):  # the first round warms up
            for name in list(runs) if rep % 2 else list(runs)[::-1]:
                proxy.CHUNK = 64 * 1024 if name == "64" else kept
                before = (
                    cpu_seconds(),
                    cpu_seconds(emu_pid),
                    tree_cpu_seconds(emu_pid, with_root=False),
                )
                rate = scatter_gather_rate(runs[name][0], data, hash=runs[name][1])
                used = cpu_seconds() - before[0], cpu_seconds(emu_pid) - before[1], \
                    tree_cpu_seconds(emu_pid, with_root=False) - before[2]  # fmt: skip
                if rep:
                    rates[name].append(rate)
                    cpu[name].append((*(u / gb for u in used), sum(used) * rate / (gb * 1e3)))
    finally:
        proxy.CHUNK = kept

    def used(name: str) -> str:
        client_, aml, nodes, cores = (median([c[i] for c in cpu[name]]) for i in range(4))
        return (
            f"client {client_:.1f}, AML side {aml:.1f}, nodes {nodes:.1f} ({cores:.1f} cores busy)"
        )

    def vs(a: str, b: str) -> float:
        return pair_ratio(rates[a], rates[b])

    return [
        Row("jobssh", f"scatter+gather {mbytes} MB, job-ssh with 64 KiB client frames / with "
            "16 KiB (MB/s)", vs("64", "16"), "x", detail=f"experiment (the library sends 16 KiB): "
            f"64 KiB {median(rates['64']):.0f} MB/s ({vs('64', 'direct'):.2f}x direct), 16 KiB "
            f"{median(rates['16']):.0f} MB/s ({vs('16', 'direct'):.2f}x), direct "
            f"{median(rates['direct']):.0f} MB/s (n={reps}); CPU s/GB: 64 KiB {used('64')}; "
            f"16 KiB {used('16')}; direct {used('direct')}"),
        Row("jobssh", f"scatter(hash=False)+gather {mbytes} MB (the transfer alone), job-ssh / "
            "direct (MB/s)", vs("16-nohash", "direct-nohash"), "x", detail=f"job-ssh "
            f"{median(rates['16-nohash']):.0f} MB/s, direct {median(rates['direct-nohash']):.0f} "
            f"MB/s (n={reps}); CPU s/GB: job-ssh {used('16-nohash')}; direct "
            f"{used('direct-nohash')}"),
    ]  # fmt: skip


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
        rows += frame_size_rows(jclient, dclient, opts, emu.proc.pid)  # type: ignore[union-attr]
    result = SuiteResult(rows=rows)
    result.notes.append(
        "jobssh: the proxy and the job's SSH daemon run in the emulator process on this "
        "machine; on AML the proxy is a regional service across the internet and the daemon "
        "runs on the node, so absolute rates there are bounded by the client's link. Here they "
        "share the cores with the client and the nodes: the CPU s/GB columns split the cost "
        "between the client (WebSocket framing, asyncssh, forwarder), the AML side and the nodes."
    )
    return result
