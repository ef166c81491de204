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
import time
from typing import Any
from urllib.parse import urlparse

from distributed.comm import parse_address

from ..exceptions import SchedulerUnreachableError

logger = logging.getLogger(__name__)

#: Bound on one TCP connection attempt to the scheduler.
PROBE_TIMEOUT = 5.0
#: How long ``connect="direct"`` keeps trying an address that never answers at all
#: (no refusal, no connection: a network that drops the packets) before giving up.
UNANSWERED_BUDGET = 30.0

#: Outcomes of :func:`probe`.
OPEN, REFUSED, UNANSWERED = "open", "refused", "unanswered"


async def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str:
    """Try one TCP connection to ``host:port``.

    Returns
    -------
    str
        :data:`OPEN` (something listens), :data:`REFUSED` (the host answered but
        nothing listens: the network path exists) or :data:`UNANSWERED` (timeout,
        no route: this machine cannot reach the host).
    """
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except ConnectionRefusedError:
        return REFUSED
    except (OSError, asyncio.TimeoutError):
        return UNANSWERED
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return OPEN


async def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    return await probe(host, port, timeout) == OPEN


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
        The cluster's :class:`~dask_amlcompute.backend.state.ClusterContext`.
    """

    def __init__(self, context: Any) -> None:
        self.context = context
        self.tunnel: Any = None
        self.mode: str | None = None

    async def connect(
        self, job_name: str, scheduler: str, dashboard: str | None, deadline: float
    ) -> tuple[str, str | None]:
        """Return the scheduler address and dashboard link the client should use.

        Parameters
        ----------
        job_name
            The AML job running the scheduler.
        scheduler, dashboard
            The addresses the scheduler published.
        deadline
            ``time.monotonic()`` after which to give up (the startup bound).
        """
        mode = self.context.settings.connect
        host, port = host_port(scheduler)
        if mode in ("direct", "auto"):
            if await self._direct(job_name, scheduler, deadline):
                self.mode = "direct"
                return scheduler, dashboard
            if mode == "direct":
                raise SchedulerUnreachableError(
                    f"The scheduler of AML job {job_name} listens on {scheduler}, which this "
                    "machine cannot reach (no answer). Run the client on the compute's VNet "
                    "(e.g. an AML compute instance), or pass connect='ssh' (or 'auto') to "
                    "tunnel through the node's SSH endpoint."
                )
            self.context.log(f"{scheduler} is not reachable directly; opening an SSH tunnel")
        protocol = parse_address(scheduler)[0]
        return await self._connect_ssh(job_name, host, port, dashboard, protocol)

    async def _direct(self, job_name: str, scheduler: str, deadline: float) -> bool:
        """Wait until the scheduler accepts a connection; False if this machine can't reach it.

        The node publishes its address only once the scheduler listens, so a
        probe succeeds unless the network drops the packets or the scheduler has
        gone. Probes repeat until a positive signal: a connection (True); for
        ``connect="auto"``, no answer at all (False: try SSH); for ``"direct"``,
        no answer for :data:`UNANSWERED_BUDGET` seconds (False). A refusal means
        the host is reachable: the job's status decides (ended: its typed error),
        bounded by ``deadline``.
        """
        from ..backend.jobwait import job_error

        ctx = self.context
        host, port = host_port(scheduler)
        first_unanswered: float | None = None
        while True:
            outcome = await probe(host, port)
            if outcome == OPEN:
                return True
            now = time.monotonic()
            if outcome == UNANSWERED:
                if ctx.settings.connect == "auto":
                    return False
                first_unanswered = first_unanswered or now
                if now - first_unanswered >= UNANSWERED_BUDGET:
                    return False
            info = await ctx.ops.get_job(job_name)
            ctx.state.jobs[job_name] = info.status
            if info.terminal:
                raise await job_error(
                    ctx.ops, info, f"AML job {job_name} ended {info.status} during startup."
                )
            if now >= deadline:
                raise SchedulerUnreachableError(
                    f"The scheduler of AML job {job_name} published {scheduler} but did not "
                    f"accept connections before the startup bound ran out (last probe: "
                    f"{outcome}; job {info.status})."
                )
            logger.info("Scheduler %s not answering yet (%s); retrying", scheduler, outcome)
            await asyncio.sleep(min(ctx.settings.poll_interval, max(0.0, deadline - now)))

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
