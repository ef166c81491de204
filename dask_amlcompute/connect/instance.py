"""The dashboard for a client that runs on an AML compute instance.

A notebook on a compute instance is opened in the browser through AML's
proxy; the browser reaches neither ``127.0.0.1`` of the instance nor a node's
private IP. AML publishes ports 8704-8993 of an instance as
``https://<instance>-<port>.<domain suffix>/`` (AML's docs on custom
applications; the domain suffix is ``<region>.instances.azureml.ms``). So, on
an instance, the cluster relays the dashboard to a free port in that range and
``dashboard_link`` names its published URL.

Detection: the file ``/mnt/azmnt/.nbvm`` that AML writes on every compute
instance (``instance=<name>`` and ``domainsuffix=<suffix>`` lines; AML's own
tools build application URLs from them). Overrides, in dask config:

- ``amlcompute.compute-instance: false`` turns it off;
- ``amlcompute.compute-instance: {name: ..., domain-suffix: ...}`` sets it;
- ``amlcompute.compute-instance-file`` names another file to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from urllib.parse import urlparse

import dask.config

from ..exceptions import ConfigurationError

logger = logging.getLogger(__name__)

#: The file AML writes on a compute instance.
NBVM_FILE = "/mnt/azmnt/.nbvm"
#: Ports of an instance that AML publishes to the browser.
PUBLISHED_PORTS = range(8704, 8994)


def detect_compute_instance() -> tuple[str, str] | None:
    """``(name, domain suffix)`` of the compute instance this process runs on, or None."""
    setting = dask.config.get("amlcompute.compute-instance", None)
    if setting is False:
        return None
    if isinstance(setting, dict):
        if not setting.get("name") or not setting.get("domain-suffix"):
            raise ConfigurationError(
                "amlcompute.compute-instance needs both 'name' and 'domain-suffix', e.g. "
                "{name: my-ci, domain-suffix: westeurope.instances.azureml.ms}"
            )
        return str(setting["name"]), str(setting["domain-suffix"])
    path = Path(dask.config.get("amlcompute.compute-instance-file", None) or NBVM_FILE)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    pairs = (line.partition("=") for line in lines)  # shell-style file: values may be quoted
    values = {key.strip(): value.strip().strip("'\"") for key, sep, value in pairs if sep}
    if values.get("instance") and values.get("domainsuffix"):
        return values["instance"], values["domainsuffix"]
    logger.warning("%s lacks instance= or domainsuffix=; not treating this as a compute instance",
                   path)  # fmt: skip
    return None


class PortRelay:
    """Relay TCP connections from the first free published port of 127.0.0.1 to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on the first free port of :data:`PUBLISHED_PORTS` (OSError: none) and return it."""
        for port in PUBLISHED_PORTS:
            with contextlib.suppress(OSError):
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
                self.port = port
                return port
        raise OSError(f"no free port in {PUBLISHED_PORTS.start}-{PUBLISHED_PORTS.stop - 1}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            logger.debug("dashboard relay cannot reach %s: %s", self.target, exc)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        """Stop listening and drop open relays (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def publish_dashboard(link: str) -> tuple[PortRelay, str] | None:
    """On a compute instance, relay the dashboard at ``link`` to a published port.

    Returns ``(relay, browser URL)``; None when not on a compute instance.
    """
    instance, parsed = detect_compute_instance(), urlparse(link)
    if instance is None or not parsed.hostname or not parsed.port:
        return None
    relay = PortRelay((parsed.hostname, parsed.port))
    port = await relay.start()
    name, suffix = instance
    return relay, f"https://{name}-{port}.{suffix}{parsed.path or '/status'}"
