"""How the client reaches the scheduler: directly, or through an SSH tunnel.

``connect="auto"`` (the default) tries, in order: the scheduler's private
address (a short, bounded probe: a client on the compute's VNet, e.g. an AML
compute instance); the main job's own SSH service through AML's WebSocket
proxy (:mod:`.jobservice`: works on a stock workspace, no public IP needed);
the node's public SSH endpoint (:mod:`.ssh`: only where the compute was created
with SSH access and node public IPs). ``"direct"``, ``"job-ssh"`` and ``"ssh"``
pick one path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlparse

from distributed.comm import get_address_host_port, parse_address

from .._protocol import OPEN, REFUSED, UNANSWERED, probe
from ..exceptions import SchedulerUnreachableError, TunnelError

logger = logging.getLogger(__name__)

#: Bound on one TCP connection attempt to the scheduler.
PROBE_TIMEOUT = 5.0
#: How long ``connect="direct"`` keeps trying an address that never answers at all
#: (no refusal, no connection: a network that drops the packets) before giving up.
UNANSWERED_BUDGET = 30.0
#: How long ``connect="auto"`` retries a refused probe (each bounded by
#: ``AUTO_PROBE_TIMEOUT``) before the next path: the node publishes its address once the
#: scheduler listens, so refusals (another network's loopback) mean "not this way".
AUTO_REFUSED_BUDGET, AUTO_PROBE_TIMEOUT = 0.6, 2.0
#: The modes that need the main job's SSH service.
JOB_SERVICE_MODES = ("auto", "job-ssh")


def temporary_tls(settings: Any) -> tuple[Any, dict[str, str]]:
    """Temporary TLS credentials when ``settings.security``: ``(Security, node env vars)``.

    The certificate and its key reach the nodes as job environment variables:
    anyone who can read the job's definition in the workspace can read them
    (see the README's security notes). They exist only for this cluster or job.
    """
    if not settings.security:
        return None, {}
    from distributed.security import Security

    from .._protocol import TLS_CERT_ENV, TLS_KEY_ENV

    security = Security.temporary()
    env = {TLS_CERT_ENV: security.tls_scheduler_cert, TLS_KEY_ENV: security.tls_scheduler_key}
    return security, env


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
        #: Relays the dashboard to a published port when the client is on a compute instance.
        self.relay: Any = None
        #: ``"direct"``, ``"job-ssh"`` or ``"ssh"`` once connected.
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

        Raises
        ------
        SchedulerUnreachableError
            No path worked; the message lists each path tried and what it needs.
        """
        mode = self.context.settings.connect
        if mode == "direct":
            await self._direct(job_name, scheduler, deadline)
            self.mode, address, link = "direct", scheduler, dashboard
        elif mode in PATHS:
            address, link = await self._tunnel(mode, job_name, scheduler, dashboard, deadline)
        else:
            address, link = await self._auto(job_name, scheduler, dashboard, deadline)
        if link:
            from .instance import publish_dashboard

            published = await publish_dashboard(link)
            if published is not None:
                self.relay, link = published
                self.context.log(f"Dashboard published on this compute instance: {link}")
        return address, link

    async def _auto(
        self, job_name: str, scheduler: str, dashboard: str | None, deadline: float
    ) -> tuple[str, str | None]:
        """Direct if a bounded probe connects, else the job's SSH service, else public SSH."""
        end = time.monotonic() + AUTO_REFUSED_BUDGET
        while (outcome := await probe(scheduler, AUTO_PROBE_TIMEOUT)) == REFUSED:
            if time.monotonic() + 0.25 >= end:
                break
            await asyncio.sleep(0.25)
        if outcome == OPEN:
            self.mode = "direct"
            return scheduler, dashboard
        tried = [
            f"direct: {scheduler} {'refused' if outcome == REFUSED else 'did not answer'} "
            "(needs the client on the compute's VNet, e.g. an AML compute instance)"
        ]
        for path in available_paths(self.context.plan):
            self.context.log(f"{scheduler} is not reachable directly; trying {PATHS[path]}")
            try:
                return await self._tunnel(path, job_name, scheduler, dashboard, deadline)
            except (SchedulerUnreachableError, TunnelError) as exc:  # a job that ended: JobError
                logger.warning("Connecting through %s failed: %s", PATHS[path], exc)
                tried.append(f"{path}: {exc}")
        for path, needs in unavailable_paths(self.context.plan).items():
            tried.append(f"{path}: not available ({needs})")
        raise SchedulerUnreachableError(
            f"Cannot reach the scheduler of AML job {job_name} by any path:\n  - "
            + "\n  - ".join(tried)
        )

    async def _tunnel(
        self, path: str, job_name: str, scheduler: str, dashboard: str | None, deadline: float
    ) -> tuple[str, str | None]:
        """Open the tunnel of ``path`` (``"job-ssh"`` or ``"ssh"``) to scheduler and dashboard."""
        host, port = get_address_host_port(scheduler)
        targets = {"scheduler": (host, port)}
        dash = urlparse(dashboard or "")
        if dash.port:
            targets["dashboard"] = (dash.hostname or host, dash.port)
        if path == "job-ssh":
            from .jobservice import open_job_service_tunnel

            self.tunnel = await open_job_service_tunnel(self.context, job_name, targets, deadline)
        else:
            from .ssh import open_scheduler_tunnel

            self.tunnel = await open_scheduler_tunnel(self.context, job_name, host, targets)
        self.mode, local = path, self.tunnel.local_address
        address = "{}://{}:{}".format(parse_address(scheduler)[0], *local("scheduler"))
        page = dash.path or "/status"
        link = "http://{}:{}{}".format(*local("dashboard"), page) if dash.port else None
        return address, link

    async def _direct(self, job_name: str, scheduler: str, deadline: float) -> None:
        """Wait until the scheduler accepts a connection (``connect="direct"``).

        No answer for :data:`UNANSWERED_BUDGET` seconds: this machine cannot reach it.
        A refusal means the host is reachable: the job's status decides (ended: its
        typed error), bounded by ``deadline``.
        """
        from ..backend.jobwait import refresh

        ctx = self.context
        first_unanswered: float | None = None
        while (outcome := await probe(scheduler, PROBE_TIMEOUT)) != OPEN:
            now = time.monotonic()
            if outcome == UNANSWERED:
                first_unanswered = first_unanswered or now
                if now - first_unanswered >= UNANSWERED_BUDGET:
                    raise SchedulerUnreachableError(
                        f"The scheduler of AML job {job_name} listens on {scheduler}, which this "
                        "machine cannot reach (no answer). Run the client on the compute's VNet "
                        "(e.g. an AML compute instance), or use connect='auto' (the job's SSH "
                        "service through AML's proxy needs no network setup)."
                    )
            info = await refresh(ctx, job_name, "during startup.")
            if now >= deadline:
                raise SchedulerUnreachableError(
                    f"The scheduler of AML job {job_name} published {scheduler} but did not "
                    f"accept connections before the startup bound ran out (last probe: "
                    f"{outcome}; job {info.status})."
                )
            logger.info("Scheduler %s not answering yet (%s); retrying", scheduler, outcome)
            await asyncio.sleep(min(ctx.settings.poll_interval, max(0.0, deadline - now)))

    @property
    def failure(self) -> Exception | None:
        """Why the tunnel gave up reconnecting (None: no tunnel, or it is up)."""
        return None if self.tunnel is None else self.tunnel.failure

    def expect_end(self) -> None:
        """The scheduler is about to stop: a tunnel dropping from now on is not reconnected."""
        if self.tunnel is not None:
            self.tunnel.expect_end()

    async def close(self) -> None:
        """Close the dashboard relay and the tunnel, if any (idempotent)."""
        if self.relay is not None:
            relay, self.relay = self.relay, None
            await relay.close()
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            await tunnel.close()


#: What each tunnel path is, for messages.
PATHS = {
    "job-ssh": "the job's SSH service through AML's proxy",
    "ssh": "the node's public SSH endpoint",
}


def available_paths(plan: Any) -> list[str]:
    """The tunnel paths ``connect="auto"`` can try for this cluster, in order."""
    return [p for p in PATHS if p not in unavailable_paths(plan)]


def unavailable_paths(plan: Any) -> dict[str, str]:
    """Tunnel paths that cannot work here, each with what it would need.

    Known before anything is submitted (from the compute's settings and this
    cluster's key, in its ``ClusterPlan``), so ``plan_cluster`` can refuse a
    ``connect=`` that cannot work without paying for a node.
    """
    out: dict[str, str] = {}
    if plan.job_ssh_key is None:
        out["job-ssh"] = (
            "the main job's SSH service and its key: connect='auto' or 'job-ssh' declares it; "
            "a reattached cluster needs ssh_key="
        )
    compute = plan.compute
    if compute is None or not compute.ssh_public_access:
        out["ssh"] = "a compute created with SSH public access (it cannot be changed later)"
    elif not compute.node_public_ip:
        out["ssh"] = "node public IPs (the compute was created without them)"
    elif not compute.admin_user:
        out["ssh"] = "an admin user with your public key on the compute"
    return out
