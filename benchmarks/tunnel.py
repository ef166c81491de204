"""Issue 4: Dask through the library's SSH tunnel vs direct; its forwarder vs ``ssh -L``.

Two 2-node clusters on the same emulator compute, one with ``connect="ssh"``
(client -> local port -> asyncssh channel -> node's SSH endpoint -> scheduler)
and one with ``connect="direct"``; both clients route data through the
scheduler (``direct_to_workers=False``), as a tunnelled client must. Runs
alternate between the two.

Bulk bytes: a sink process listens on the rank-0 node's private address; a
sender process pushes the same stream through (a) the library's
:class:`~dask_amlcompute.connect.tunnel.SSHTunnel` running on an event loop thread of
this process, as it does inside a client, and (b) OpenSSH ``ssh -N -L`` to the
same node SSH endpoint, with the same key and host key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common import (
    BENCH_DIR,
    EmulatorProcess,
    Options,
    Row,
    SuiteResult,
    aml_cluster,
    cluster_kwargs,
    free_port,
    interleave,
    listening_process,
    map_rate,
    median,
    pair_ratio,
    shippable,
    ssh_keypair,
    stop_process,
    timed,
)
from distributed import Client

from dask_amlcompute.connect.tunnel import SSHTunnel

COMPUTE = "bench-ssh"
THROUGHPUT_TARGET = 0.9
BULK_TARGET = 0.9
NETPUMP = str(BENCH_DIR / "netpump.py")


def _inc(x: int) -> int:
    return x + 1


inc = shippable(_inc)


def round_trip(client: Client, n: int) -> float:
    """Mean seconds of ``submit(...).result()`` over ``n`` sequential tiny tasks."""

    def work() -> None:
        for i in range(n):
            client.submit(inc, i, pure=False).result()

    return timed(work) / n


def with_cpu(fn, cpu: list[float], *args):
    """Call ``fn(*args)``; append the CPU seconds this process spent to ``cpu``."""
    before = time.process_time()
    out = fn(*args)
    cpu.append(time.process_time() - before)
    return out


def scatter_gather_rate(client: Client, data: bytes, hash: bool = True) -> float:
    """MB/s of scattering ``data`` to a worker and gathering it back (both via the scheduler).

    ``hash=False``: the key is random instead of ``dask.tokenize(data)`` (1.5 s per 100 MB here).
    """

    def work() -> None:
        future = client.scatter(data, direct=False, hash=hash)
        assert len(client.gather(future, direct=False)) == len(data)
        client.cancel(future)

    return 2 * len(data) / 1e6 / timed(work)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (None: this process)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send_rate(port: int, nbytes: int, cpu: list[float], pid: int | None = None) -> float:
    """MB/s of one bulk transfer to ``127.0.0.1:port``; appends the forwarder's CPU s/GB."""
    before = cpu_seconds(pid)
    out = subprocess.run(
        [sys.executable, NETPUMP, "send", "127.0.0.1", str(port), str(nbytes)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    cpu.append((cpu_seconds(pid) - before) / (nbytes / 1e9))
    return nbytes / 1e6 / float(out.stdout.strip())


@contextlib.contextmanager
def sink_on(host: str, log: Path) -> Iterator[int]:
    """A netpump sink process listening on ``host``; yields its port."""
    proc = subprocess.Popen(
        [sys.executable, NETPUMP, "sink", host],
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),  # noqa: SIM115  the child keeps its own copy
        text=True,
        start_new_session=True,
    )
    try:
        yield int(proc.stdout.readline())  # type: ignore[union-attr]
    finally:
        stop_process(proc)


@contextlib.contextmanager
def library_forward(
    node: dict,
    key: Path,
    target: tuple[str, int],
    after_start: Callable[[SSHTunnel], None] | None = None,
) -> Iterator[int]:
    """The library's SSHTunnel on its own event loop thread; yields the local port.

    ``after_start(tunnel)`` runs on that thread once the tunnel is open (experiments).
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-tunnel", daemon=True)
    thread.start()
    tunnel = SSHTunnel(
        "127.0.0.1",
        node["ssh_port"],
        "azureuser",
        client_keys=[str(key)],
        known_hosts=[node["host_public_key"]],
        targets={"sink": target},
    )
    try:
        asyncio.run_coroutine_threadsafe(tunnel.start(), loop).result(60)
        if after_start is not None:
            loop.call_soon_threadsafe(after_start, tunnel)
        yield tunnel.local_address("sink")[1]
    finally:
        asyncio.run_coroutine_threadsafe(tunnel.close(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def openssh_forward(
    node: dict, key: Path, target: tuple[str, int], workdir: Path, cipher: str | None = None
) -> Iterator[tuple[int, Path, int]]:
    """``ssh -N -L`` to the node's SSH endpoint; yields the local port, ssh's log and PID.

    ``cipher`` None lets OpenSSH negotiate its default (chacha20-poly1305 first).
    """
    known = workdir / "openssh_known_hosts"
    key_type, key_b64 = node["host_public_key"].split()[:2]
    known.write_text(f"[127.0.0.1]:{node['ssh_port']} {key_type} {key_b64}\n")
    port = free_port()
    log = workdir / f"openssh-{port}.log"
    cmd = ["ssh", *(["-c", cipher] if cipher else []), "-F", "/dev/null", "-N", "-v",
         "-p", str(node["ssh_port"]), "-i", str(key),
         "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "ExitOnForwardFailure=yes",
         "-o", "Compression=no", "-L", f"127.0.0.1:{port}:{target[0]}:{target[1]}",
         "azureuser@127.0.0.1"]  # fmt: skip
    with listening_process(cmd, log, port, "ssh -L") as pid:
        yield port, log, pid


def bulk_rows(opts: Options, emu: EmulatorProcess, job: str, key: Path) -> list[Row]:
    """Bulk bytes through the library's forwarder vs ``ssh -L``, same endpoint and sink.

    First with ``ssh -c aes128-gcm@openssh.com``, the cipher the library negotiates,
    so only the client-side forwarder differs; then with OpenSSH's default cipher.
    """
    if shutil.which("ssh") is None:
        missing = "not measured: ssh client missing"
        return [Row("tunnel", "bulk bytes, library forwarder / ssh -L", float("nan"), "x",
                    f">= {BULK_TARGET}x", None, missing)]  # fmt: skip
    nbytes = opts.pick(256, 64) * 2**20
    reps = opts.pick(4, 2)
    node = emu.node(job, 0)
    target_text = f">= {BULK_TARGET}x"
    rows = []
    with (
        sink_on(node["ip"], opts.workdir / "sink.log") as sink_port,
        library_forward(node, key, (node["ip"], sink_port)) as lib_port,
    ):
        for cipher, target in (("aes128-gcm@openssh.com", True), (None, False)):
            with openssh_forward(node, key, (node["ip"], sink_port), opts.workdir, cipher) as (
                ssh_port, log, pid,
            ):  # fmt: skip
                ssh_cpu: list[float] = []
                lib_cpu: list[float] = []
                ssh_rates, lib_rates = interleave(
                    lambda: send_rate(ssh_port, nbytes, ssh_cpu, pid),  # noqa: B023
                    lambda: send_rate(lib_port, nbytes, lib_cpu),  # noqa: B023
                    reps=reps,
                )
                used = re.search(r"client->server cipher: (\S+)", log.read_text())
            ratio = pair_ratio(lib_rates, ssh_rates)
            rows.append(Row(
                "tunnel",
                f"bulk bytes ({nbytes >> 20} MiB), library forwarder / ssh -L "
                f"({'same cipher' if cipher else 'OpenSSH default cipher'})",
                ratio, "x", target_text if target else "", (ratio >= BULK_TARGET) if target else None,
                f"library median {median(lib_rates):.0f} MB/s (aes128-gcm), ssh -L median "
                f"{median(ssh_rates):.0f} MB/s ({used.group(1) if used else 'cipher ?'}), "
                f"n={reps}; forwarder CPU: library {median(lib_cpu):.1f} s/GB (whole client "
                f"process), ssh {median(ssh_cpu):.1f} s/GB",
            ))  # fmt: skip
    return rows


def path_rows(suite: str, label: str, client: Client, direct: Client, opts: Options) -> list[Row]:
    """Task latency, ``client.map`` throughput and scatter/gather: ``client`` vs ``direct``.

    Both clients route data through the scheduler; runs alternate between them.
    ``label`` names ``client``'s path in the rows (``"ssh"``, ``"job-ssh"``).
    """
    n_tasks, n_latency = opts.pick(10_000, 1_000), opts.pick(200, 100)
    mbytes, reps, map_reps = opts.pick(100, 20), opts.pick(3, 2), opts.pick(2, 2)
    rows: list[Row] = []
    d, p = interleave(lambda: round_trip(direct, n_latency),
                      lambda: round_trip(client, n_latency), reps=reps)  # fmt: skip
    rows.append(Row(suite, f"task round-trip latency ({n_latency} tiny tasks), {label} / direct",
                    pair_ratio(p, d), "x", detail=f"{label} median {median(p) * 1e3:.1f} ms/task, "
                    f"direct {median(d) * 1e3:.1f} ms/task (n={reps}); lower is better"))  # fmt: skip
    dcpu: list[float] = []
    pcpu: list[float] = []
    map_rate(direct, 500), map_rate(client, 500)  # warm-up
    d, p = interleave(lambda: with_cpu(map_rate, dcpu, direct, n_tasks),
                      lambda: with_cpu(map_rate, pcpu, client, n_tasks), map_reps,
                      warmup=0)  # fmt: skip
    ratio = pair_ratio(p, d)
    rows.append(Row(suite, f"client.map {n_tasks} no-op tasks/s, {label} / direct", ratio, "x",
                    f">= {THROUGHPUT_TARGET}x", ratio >= THROUGHPUT_TARGET,
                    f"{label} median {median(p):.0f} tasks/s, direct {median(d):.0f} tasks/s "
                    f"(n={map_reps}); client-process CPU per 1k tasks: {label} "
                    f"{median(pcpu) * 1e3 / n_tasks:.2f} s, direct "
                    f"{median(dcpu) * 1e3 / n_tasks:.2f} s"))  # fmt: skip
    data = os.urandom(mbytes * 10**6)
    d, p = interleave(lambda: scatter_gather_rate(direct, data),
                      lambda: scatter_gather_rate(client, data), reps=reps)  # fmt: skip
    rows.append(Row(suite, f"scatter+gather {mbytes} MB, {label} / direct (MB/s)",
                    pair_ratio(p, d), "x", detail=f"{label} median {median(p):.0f} MB/s, direct "
                    f"{median(d):.0f} MB/s (n={reps}); bytes counted both ways"))  # fmt: skip
    return rows


def run(opts: Options) -> SuiteResult:
    """Measure Dask through the tunnel vs direct, and the forwarder vs ssh -L."""
    key, public = ssh_keypair(opts.workdir)
    computes = [{"name": COMPUTE, "max_nodes": 4, "admin_user": "azureuser",
                 "ssh_public_keys": [public]}]  # fmt: skip
    ssh_extra = {
        "connect": "ssh",
        "ssh_key": str(key),
        "known_hosts": str(opts.workdir / "known_hosts"),
        "ssh_trust_on_first_use": True,
    }
    rows: list[Row] = []
    with (
        EmulatorProcess(opts.workdir, computes) as emu,
        aml_cluster(emu, emu.ml_client(), **cluster_kwargs(COMPUTE, n_nodes=2)) as direct,
        aml_cluster(emu, emu.ml_client(), **cluster_kwargs(COMPUTE, n_nodes=2, **ssh_extra)) as ssh,
        Client(direct, direct_to_workers=False) as dclient,
        Client(ssh, direct_to_workers=False) as sclient,
    ):
        assert ssh.scheduler_address.startswith("tcp://127.0.0.1:"), ssh.scheduler_address
        dclient.wait_for_workers(2, timeout=60)
        sclient.wait_for_workers(2, timeout=60)

        rows += path_rows("tunnel", "ssh", sclient, dclient, opts)
        rows += bulk_rows(opts, emu, ssh.main_job_name, key)
    result = SuiteResult(rows=rows)
    result.notes.append(
        "tunnel: both bulk paths end in the emulator's asyncssh server (in the emulator "
        "process); on real AML the node runs OpenSSH sshd and the client crosses a WAN, "
        "so absolute rates there differ; the ratio isolates the client-side forwarder."
    )
    return result
