"""The direct probe tells "listening", "refused" (host reachable) and "no answer" apart."""

from __future__ import annotations

import asyncio
import socket

from dask_amlcompute._protocol import OPEN, REFUSED, probe


def test_probe_sees_a_listener_and_a_refusal():
    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            assert await probe(f"tcp://127.0.0.1:{port}", 5) == OPEN
        # the same port with nothing listening: the host answers with a refusal
        assert await probe(f"tcp://127.0.0.1:{port}", 5) == REFUSED

    asyncio.run(main())


def test_probe_refusal_is_fast():
    with socket.socket() as sock:  # a port that is bound but not listening refuses
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert asyncio.run(asyncio.wait_for(probe(f"tcp://127.0.0.1:{port}", 5), 2)) == REFUSED
