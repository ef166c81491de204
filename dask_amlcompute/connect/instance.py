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
from dataclasses import dataclass
from pathlib import Path

import dask.config

logger = logging.getLogger(__name__)

#: The file AML writes on a compute instance.
NBVM_FILE = "/mnt/azmnt/.nbvm"
#: Ports of an instance that AML publishes to the browser.
PUBLISHED_PORTS = range(8704, 8994)


@dataclass(frozen=True)
class ComputeInstance:
    """The compute instance this client runs on."""

    name: str
    domain_suffix: str

    def url(self, port: int, path: str = "/status") -> str:
        """The browser URL of ``port`` on this instance."""
        return f"https://{self.name}-{port}.{self.domain_suffix}{path}"


def detect_compute_instance() -> ComputeInstance | None:
    """The compute instance this process runs on, or None (see the module docstring)."""
    setting = dask.config.get("amlcompute.compute-instance", None)
    if setting is False:
        return None
    if isinstance(setting, dict):
        name, suffix = setting.get("name"), setting.get("domain-suffix")
        if not name or not suffix:
            raise ValueError(
                "amlcompute.compute-instance needs both 'name' and 'domain-suffix', e.g. "
                "{name: my-ci, domain-suffix: westeurope.instances.azureml.ms}"
            )
        return ComputeInstance(str(name), str(suffix))
    path = Path(dask.config.get("amlcompute.compute-instance-file", None) or NBVM_FILE)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("'\"")  # shell-style file: may be quoted
    if values.get("instance") and values.get("domainsuffix"):
        return ComputeInstance(values["instance"], values["domainsuffix"])
    logger.warning("%s lacks instance= or domainsuffix=; not treating this as a compute instance",
                   path)  # fmt: skip
    return None


class PortRelay:
    """Relay TCP connections from a local port to ``target`` (host, port).

    Parameters
    ----------
    target
        Where each accepted connection is relayed to.
    host
        Address to listen on.
    ports
        Candidate ports, tried in order; the first free one is used.
    """

    def __init__(
        self, target: tuple[str, int], host: str = "127.0.0.1", ports: range = PUBLISHED_PORTS
    ) -> None:
        self.target, self.host, self.ports = target, host, ports
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on the first free candidate port and return it.

        Raises
        ------
        OSError
            Every candidate port is taken.
        """
        last: OSError | None = None
        for port in self.ports:
            try:
                self._server = await asyncio.start_server(self._serve, self.host, port)
            except OSError as exc:
                last = exc
                continue
            self.port = port
            return port
        raise OSError(f"no free port in {self.ports.start}-{self.ports.stop - 1}: {last}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
        except (OSError, asyncio.TimeoutError) as exc:
            logger.debug("dashboard relay cannot reach %s: %s", self.target, exc)
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
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

    Returns
    -------
    tuple or None
        ``(relay, browser URL)``; None when not on a compute instance.
    """
    from urllib.parse import urlparse

    instance = detect_compute_instance()
    if instance is None:
        return None
    parsed = urlparse(link)
    if not parsed.hostname or not parsed.port:
        return None
    relay = PortRelay((parsed.hostname, parsed.port))
    port = await relay.start()
    return relay, instance.url(port, parsed.path or "/status")
