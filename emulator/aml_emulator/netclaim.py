"""Claim a loopback /16 for one emulator's node addresses.

Node "private IPs" are ``127.{net}.{compute + 1}.{slot + 1}``.  Two emulators
running at the same time on one machine (parallel test processes, a CLI
emulator next to a test run) must not hand out the same addresses, or their
nodes' servers collide (``Address already in use``).  Each emulator therefore
claims a ``net`` octet by listening on ``127.{net}.0.1:CLAIM_PORT`` (an
address no node uses) for as long as it runs; the first free octet wins, so a
lone emulator uses ``127.0.N.M``.
"""

from __future__ import annotations

import socket

#: Port of the claim socket (on the ``.0.1`` address of each /16, never used by nodes).
CLAIM_PORT = 39871


def claim_loopback_net(first: int = 0) -> tuple[int, socket.socket]:
    """Claim the first free second octet of 127.0.0.0/8.

    Parameters
    ----------
    first
        First octet value to try.

    Returns
    -------
    tuple
        ``(octet, claim_socket)``; close the socket to release the claim.

    Raises
    ------
    RuntimeError
        If all 256 octets are taken.
    """
    for offset in range(256):
        net = (first + offset) % 256
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((f"127.{net}.0.1", CLAIM_PORT))
            sock.listen(1)
        except OSError:
            sock.close()
            continue
        return net, sock
    raise RuntimeError("no free 127.X.0.0/16 block for emulator node addresses")
