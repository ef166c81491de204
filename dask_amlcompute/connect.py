"""How the client reaches the scheduler: directly, or through an SSH tunnel.

``connect="direct"`` is for a client on the compute's VNet (an AML compute
instance, a VM in the same network). ``connect="ssh"`` opens an SSH tunnel to
the public SSH endpoint of the node running the scheduler and forwards the
scheduler and dashboard ports. ``connect="auto"`` probes the scheduler's
private address with a short, bounded timeout and falls back to SSH.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlparse

from distributed.comm import parse_address

from .exceptions import SchedulerUnreachableError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
DIRECT_PROBES = 3


async def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def host_port(address: str) -> tuple[str, int]:
    """``tcp://10.0.0.4:8786`` -> ``("10.0.0.4", 8786)``."""
    _, loc = parse_address(address)
    host, _, port = loc.rpartition(":")
    return host.strip("[]"), int(port)


class SchedulerConnector:
    """Connects the client to a published scheduler address; owns any tunnel.

    Parameters
    ----------
    context
        The cluster's :class:`~dask_amlcompute.jobs.ClusterContext`.
    """

    def __init__(self, context: Any) -> None:
        self.context = context
        self.tunnel: Any = None
        self.mode: str | None = None

    async def connect(
        self, job_name: str, scheduler: str, dashboard: str | None
    ) -> tuple[str, str | None]:
        """Return the scheduler address and dashboard link the client should use."""
        mode = self.context.settings.connect
        host, port = host_port(scheduler)
        if mode in ("direct", "auto"):
            # direct: a few bounded probes (a loaded machine can miss one); auto: one probe
            for attempt in range(DIRECT_PROBES if mode == "direct" else 1):
                if attempt:
                    await asyncio.sleep(1.0)
                if await reachable(host, port):
                    self.mode = "direct"
                    return scheduler, dashboard
            if mode == "direct":
                raise SchedulerUnreachableError(
                    f"The scheduler of AML job {job_name} listens on {scheduler}, which this "
                    f"machine cannot reach within {PROBE_TIMEOUT:.0f}s. Run the client on the "
                    "compute's VNet (e.g. an AML compute instance), or pass connect='ssh' "
                    "(or 'auto') to tunnel through the node's SSH endpoint."
                )
            self.context.log(f"{scheduler} is not reachable directly; opening an SSH tunnel")
        protocol = parse_address(scheduler)[0]
        return await self._connect_ssh(job_name, host, port, dashboard, protocol)

    async def _connect_ssh(
        self, job_name: str, host: str, port: int, dashboard: str | None, protocol: str = "tcp"
    ) -> tuple[str, str | None]:
        from .ssh import open_scheduler_tunnel

        targets = {"scheduler": (host, port)}
        dash = urlparse(dashboard) if dashboard else None
        if dash is not None and dash.port:
            targets["dashboard"] = (dash.hostname or host, dash.port)
        self.tunnel = await open_scheduler_tunnel(self.context, job_name, host, targets)
        self.mode = "ssh"
        address = self.tunnel.local_url("scheduler", protocol)
        link = None
        if "dashboard" in targets and dash is not None:
            lhost, lport = self.tunnel.local_address("dashboard")
            link = f"http://{lhost}:{lport}{dash.path or '/status'}"
        return address, link

    async def close(self) -> None:
        """Close the tunnel, if any (idempotent)."""
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            await tunnel.close()
