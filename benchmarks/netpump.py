"""Bulk-byte sink and source for the tunnel benchmark, run as separate processes.

``python netpump.py sink HOST`` listens on ``HOST`` (a free port, printed on
stdout) and, for each connection, reads an 8-byte length then that many bytes
and answers one byte. ``python netpump.py send HOST PORT NBYTES`` sends NBYTES
that way and prints the seconds from connect to the answer. Neither imports
the library, so both tunnels under test carry the same plain TCP stream.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

CHUNK = 1 << 20


def sink(host: str) -> None:
    """Serve connections one after another until killed."""
    with socket.create_server((host, 0)) as server:
        print(server.getsockname()[1], flush=True)
        buf = bytearray(CHUNK)
        while True:
            conn, _ = server.accept()
            with conn:
                header = b""
                while len(header) < 8:
                    part = conn.recv(8 - len(header))
                    if not part:
                        break
                    header += part
                if len(header) < 8:
                    continue
                left = struct.unpack("!Q", header)[0]
                while left > 0:
                    n = conn.recv_into(buf, min(CHUNK, left))
                    if not n:
                        break
                    left -= n
                conn.sendall(b"k")


def send(host: str, port: int, nbytes: int) -> float:
    """Seconds to push ``nbytes`` to a sink at ``host:port`` and get its answer."""
    payload = memoryview(bytes(CHUNK))
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=120) as conn:
        conn.sendall(struct.pack("!Q", nbytes))
        left = nbytes
        while left > 0:
            n = min(CHUNK, left)
            conn.sendall(payload[:n])
            left -= n
        if conn.recv(1) != b"k":
            raise ConnectionError("the sink closed before answering")
    return time.perf_counter() - start


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        sink(sys.argv[2])
    else:
        print(send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
