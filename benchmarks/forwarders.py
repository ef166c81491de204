"""Issue 4, bulk target: which in-process SSH forwarder could reach 0.9x of ``ssh -L``?

An opt-in suite (``python benchmarks/run.py --only forwarders``): it measures
the SSH libraries a Python process can forward ports with, each against
OpenSSH ``ssh -N -L`` in the same run, to the same SSH server and sink:

* ``asyncssh``: the library's :class:`~dask_amlcompute.connect.tunnel.SSHTunnel` as
  shipped, on an event loop thread of this process (as inside a client);
* ``asyncssh, no MSG_IGNORE``: the same, with asyncssh's empty ``SSH_MSG_IGNORE``
  before every encrypted packet dropped. An experiment only (it wraps a method
  of asyncssh's connection object); it shows what an upstream option would give;
* ``libssh2`` (``ssh2-python``) and ``paramiko``: a minimal blocking forwarder in
  its own process (so they get a core of their own, like ``ssh``).

The SSH server is the emulator's :class:`~aml_emulator.ssh.NodeSSHServer`
in its own process; the stream is ``netpump.py``'s (an 8-byte length, the
bytes, a 1-byte answer). ``ssh2-python`` and ``paramiko`` come with
``pip install -e ".[forwarder-probes]"``; a missing one is reported as not measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from common import (
    Options,
    Row,
    SuiteResult,
    free_port,
    interleave,
    listening_process,
    median,
    pair_ratio,
    ssh_keypair,
    stop_process,
)
from tunnel import BULK_TARGET, library_forward, openssh_forward, send_rate, sink_on

USER = "azureuser"
CIPHER = "aes128-gcm@openssh.com"


def serve(public_key_file: str) -> None:
    """Run a NodeSSHServer on 127.0.0.1 (forwards to 127.0.0.1 only); print port and host key."""
    from aml_emulator.ssh import NodeSSHServer

    async def main() -> None:
        server = NodeSSHServer(admin_user=USER, allowed_forward_hosts=["127.0.0.1"],
                               authorized_keys=[Path(public_key_file).read_text()])  # fmt: skip
        await server.start()
        print(server.port, server.host_public_key, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _pump_netpump_stream(local: socket.socket, write: Callable[[bytes], None]) -> bool:
    """Forward one netpump stream (8-byte length + payload) from ``local`` via ``write``.

    Returns False when ``local`` closed early (e.g. a probe that only connects).
    """
    got, total = 0, None
    while total is None or got < total:
        data = local.recv(1 << 18)
        if not data:
            return False
        if total is None and got == 0 and len(data) >= 8:
            total = 8 + struct.unpack("!Q", data[:8])[0]
        got += len(data)
        write(data)
    return True


def forward(kind: str, ssh_port: int, key: str, target_port: int, local_port: int) -> None:
    """A blocking ``libssh2`` or ``paramiko`` forwarder for netpump streams, one at a time."""
    server = socket.create_server(("127.0.0.1", local_port))
    if kind == "libssh2":
        from ssh2.session import LIBSSH2_METHOD_CRYPT_CS, LIBSSH2_METHOD_CRYPT_SC, Session

        sock = socket.create_connection(("127.0.0.1", ssh_port))
        session = Session()
        session.method_pref(LIBSSH2_METHOD_CRYPT_CS, CIPHER)
        session.method_pref(LIBSSH2_METHOD_CRYPT_SC, CIPHER)
        session.handshake(sock)
        session.userauth_publickey_frommemory(USER, Path(key).read_bytes())

        def channel():
            chan = session.direct_tcpip_ex("127.0.0.1", target_port, "127.0.0.1", 0)

            def write(data: bytes) -> None:
                view = memoryview(data)
                while len(view):
                    view = view[chan.write(bytes(view))[1] :]

            def answer() -> bytes:
                while True:
                    size, data = chan.read()
                    if size > 0:
                        return data

            return chan, write, answer
    else:
        import paramiko

        transport = paramiko.Transport(("127.0.0.1", ssh_port))
        transport.get_security_options().ciphers = ("aes128-ctr",)  # its fastest offered here
        transport.connect(username=USER, pkey=paramiko.Ed25519Key.from_private_key_file(key))

        def channel():
            chan = transport.open_channel("direct-tcpip", ("127.0.0.1", target_port),
                                          ("127.0.0.1", 0))  # fmt: skip
            return chan, chan.sendall, lambda: chan.recv(1)

    print("ready", flush=True)
    while True:
        local, _ = server.accept()
        chan, write, answer = channel()
        if _pump_netpump_stream(local, write):
            local.sendall(answer())
        local.close()
        chan.close()


@contextlib.contextmanager
def process_forward(
    kind: str, node: dict, key: Path, sink_port: int, log: Path
) -> Iterator[tuple[int, int]]:
    """Run :func:`forward` in its own process; yields its local port and PID."""
    port = free_port()
    cmd = [sys.executable, __file__, "forward", kind, str(node["ssh_port"]), str(key),
           str(sink_port), str(port)]  # fmt: skip
    with listening_process(cmd, log, port, f"the {kind} forwarder") as pid:
        yield port, pid


def drop_ignore_packets(tunnel: object) -> None:
    """Experiment: make the tunnel's asyncssh connection skip its per-packet MSG_IGNORE."""
    from asyncssh.constants import MSG_IGNORE

    conn = tunnel._conn  # benchmark-only look inside the tunnel
    send = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, **kwargs: object) -> None:
        if pkttype != MSG_IGNORE:
            send(pkttype, *args, **kwargs)

    conn.send_packet = send_packet


def run(opts: Options) -> SuiteResult:
    """Each available forwarder vs ``ssh -L`` with the same cipher, interleaved."""
    if shutil.which("ssh") is None:
        return SuiteResult(notes=["forwarders: not measured, the OpenSSH client is missing"])
    key, public = ssh_keypair(opts.workdir)
    public_file = opts.workdir / "id_ed25519.pub"
    public_file.write_text(public)
    nbytes, reps = opts.pick(256, 64) * 2**20, opts.pick(6, 3)
    server = subprocess.Popen([sys.executable, __file__, "serve", str(public_file)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    rows: list[Row] = []
    try:
        port, host_key = server.stdout.readline().split(maxsplit=1)  # type: ignore[union-attr]
        node = {"ssh_port": int(port), "host_public_key": host_key.strip()}
        with (
            sink_on("127.0.0.1", opts.workdir / "sink.log") as sink_port,
            openssh_forward(node, key, ("127.0.0.1", sink_port), opts.workdir, CIPHER) as (
                ssh_port, _, ssh_pid,
            ),
        ):  # fmt: skip
            candidates = [("asyncssh (SSHTunnel as shipped, in-process)", "asyncssh", None),
                          ("asyncssh without per-packet MSG_IGNORE (experiment, not shipped)",
                           "asyncssh", drop_ignore_packets),
                          ("libssh2 via ssh2-python (own process)", "libssh2", "ssh2"),
                          ("paramiko, aes128-ctr (own process)", "paramiko", "paramiko")]  # fmt: skip
            for label, kind, extra in candidates:
                if isinstance(extra, str) and importlib.util.find_spec(extra) is None:
                    rows.append(
                        Row(
                            "forwarders",
                            f"{label} / ssh -L",
                            float("nan"),
                            "x",
                            detail='not measured: pip install -e ".[forwarder-probes]"',
                        )
                    )
                    continue
                if kind == "asyncssh":
                    ctx = library_forward(node, key, ("127.0.0.1", sink_port), after_start=extra)
                else:
                    log = opts.workdir / f"{kind}.log"
                    ctx = process_forward(kind, node, key, sink_port, log)
                with ctx as opened:
                    lib_port, pid = opened if isinstance(opened, tuple) else (opened, None)
                    ssh_cpu: list[float] = []
                    alt_cpu: list[float] = []
                    ssh_rates, alt_rates = interleave(
                        lambda: send_rate(ssh_port, nbytes, ssh_cpu, ssh_pid),  # noqa: B023
                        lambda: send_rate(lib_port, nbytes, alt_cpu, pid),  # noqa: B023
                        reps=reps,
                    )
                ratio = pair_ratio(alt_rates, ssh_rates)
                rows.append(Row(
                    "forwarders", f"bulk bytes ({nbytes >> 20} MiB), {label} / ssh -L", ratio, "x",
                    f">= {BULK_TARGET}x", ratio >= BULK_TARGET,
                    f"{median(alt_rates):.0f} MB/s vs ssh -L {median(ssh_rates):.0f} MB/s "
                    f"({CIPHER}), n={reps}; forwarder CPU {median(alt_cpu):.1f} s/GB vs ssh "
                    f"{median(ssh_cpu):.1f} s/GB; per-pair "
                    + ", ".join(f"{a / s:.2f}" for a, s in zip(alt_rates, ssh_rates, strict=True)),
                ))  # fmt: skip
    finally:
        stop_process(server)
    result = SuiteResult(rows=rows)
    result.notes.append(
        "forwarders: the SSH server, the sink, the sender and the forwarder share this "
        "machine's cores, so a forwarder's CPU per byte decides its rate; on real AML the "
        "client's link to the node is usually the limit."
    )
    return result


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        forward(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
