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


def test_a_cancelled_probe_is_cancelled_even_when_its_connection_has_just_failed():
    # Python 3.11's asyncio.wait_for returned the inner result when a cancel came in the loop
    # iteration the connection was refused (cpython gh-86296): a node's probe loop then ran on
    # after SIGTERM until its death timeout. Cancel after each of the first iterations.
    async def main():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
            for iterations in [0, 1, 2, 3, 4] * 10:
                task = asyncio.ensure_future(probe(address, 5))
                for _ in range(iterations):
                    await asyncio.sleep(0)
                if task.done():  # refused before the cancel: nothing to cancel
                    assert task.result() == REFUSED
                    continue
                task.cancel()
                try:
                    result = await task
                except asyncio.CancelledError:
                    continue
                raise AssertionError(f"cancelled after {iterations} iteration(s): {result}")

    asyncio.run(main())
