"""AML's job SSH service: a daemon per node in the job's network, reached through a WebSocket proxy.

A command job (single-node, or with a PyTorch, TensorFlow or MPI distribution:
:func:`~aml_emulator.jobspec.parse_services`) may declare
``services={"ssh": SshJobService(ssh_public_keys=..., nodes="all")}``. AML then
runs an SSH daemon in the job's container on each node (every node with
``nodes="all"``, else rank 0 only) that accepts the job's public keys, and
publishes one *service instance* per node in run history::

    GET /history/v1.0/.../runs/{run}/serviceinstances/{nodeIndex}
    {"instances": {"ssh": {"type": "SSH", "port": 22, "status": "Running", "error": null,
                           "endpoint": null,
                           "properties": {"ProxyEndpoint": "wss://ssh-<id>.<region>.nodes.azureml.ms"}}}}

(``ml_client.jobs.show_services(name, node_index)``; no instances -> None).
Clients (``az ml job connect-ssh``, public source Azure/azure-cli-extensions
``src/machinelearningservices/azext_mlv2/manual/custom/_ssh_connector.py`` and
``_ssh_command.py``) open a WebSocket to ``{ProxyEndpoint}/nbip/v1.0/ws-tcp``
with ``Authorization: Bearer <ARM token>`` (scope
``https://management.core.windows.net/.default``), carry the raw SSH bytes in
binary frames and log in as ``azureuser``. Only the job's owner may connect.

The emulator does the same: :class:`JobServices` starts a
:class:`~aml_emulator.ssh.NodeSSHServer` per node and service when
the job's nodes start, listening on the node's own address *inside the node's
network* (reachable only through the proxy), with a fresh host key (a new
container per job), local forwards allowed to the node's address and
``127.0.0.1`` (what a daemon in the container reaches) and dialled from the
node's network. :class:`JobServiceProxyHandler` is the WebSocket proxy at
``{ws|wss}://{emulator}/jobservice/{id}/nbip/v1.0/ws-tcp``: 401 without an
acceptable ARM token, 403 for anyone but the job's owner, 404 for an unknown
instance or one not ``Running``; then binary frames are relayed to and from a
TCP connection to the daemon. An instance reports ``Starting`` until
``job_service_delay`` seconds after the nodes started (AML: 30-120 s), then
``Running``; when the job ends its instances are gone and its daemons and
relays closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import tornado.iostream
import tornado.websocket

from . import identity
from .errors import ApiError
from .jobspec import SshServiceSpec
from .network import NodeNetwork
from .shapes import arm_error
from .ssh import NodeSSHServer
from .state import JobRecord

__all__ = [
    "JOB_SSH_USER",
    "PROXY_PATH",
    "JobServiceProxyHandler",
    "JobServices",
    "jobservice_routes",
]

logger = logging.getLogger(__name__)

#: User of the job's SSH daemon: ``az ml job connect-ssh`` logs in as ``azureuser``
#: (``_ssh_command.py`` ``get_ssh_command``: ``ssh ... azureuser@{proxyEndpoint}``).
JOB_SSH_USER = "azureuser"
#: Port AML reports for an SSH service instance (the daemon's port in the container).
SSH_SERVICE_PORT = 22
#: Path of the TCP relay under a ProxyEndpoint.
PROXY_PATH = "/nbip/v1.0/ws-tcp"
#: Seconds the proxy may take to connect to a node's daemon.
CONNECT_TIMEOUT = 10.0
#: Seconds allowed for closing one daemon.
CLOSE_TIMEOUT = 5.0
#: Largest chunk read from the daemon per binary frame.
CHUNK = 64 * 1024


@dataclass
class ServiceInstance:
    """One running daemon: the SSH service ``name`` on node ``rank`` of ``job``."""

    id: str
    job: JobRecord
    rank: int
    name: str
    compute: str
    ip: str
    network: NodeNetwork
    server: NodeSSHServer | None = None
    error: str | None = None

    @property
    def port(self) -> int | None:
        """The daemon's port in the node's network (None when it failed to start)."""
        return None if self.server is None else self.server.port


class JobServices:
    """The job SSH services of one emulator: daemons, instance reports, open relays.

    Parameters
    ----------
    delay
        Seconds an instance reports ``Starting`` after the job's nodes start.

    Notes
    -----
    Used from the emulator's event loop only.
    """

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = float(delay)
        self._by_id: dict[str, ServiceInstance] = {}
        self._by_job: dict[str, list[ServiceInstance]] = {}
        self._declared: dict[str, tuple[SshServiceSpec, ...]] = {}
        self._relays: set[JobServiceProxyHandler] = set()

    # --------------------------------------------------------------- lifecycle
    async def start(
        self,
        job: JobRecord,
        services: Iterable[SshServiceSpec],
        compute: str,
        network: NodeNetwork,
    ) -> None:
        """Start the daemons of a job whose nodes are about to start.

        Parameters
        ----------
        job
            The job, its ``nodes`` made.
        services
            The SSH services it declared.
        compute
            Name of the compute the nodes are on.
        network
            The nodes' network: the daemons listen in it and dial forwards from it.
        """
        declared = tuple(services)
        self._declared[job.name] = declared
        if not declared:
            return
        await network.open(compute)
        started = self._by_job.setdefault(job.name, [])
        for node in job.nodes:
            for service in declared:
                if not service.on_node(node.rank):
                    continue
                instance = ServiceInstance(
                    id=secrets.token_urlsafe(16),
                    job=job,
                    rank=node.rank,
                    name=service.name,
                    compute=compute,
                    ip=node.ip,
                    network=network,
                )
                server = NodeSSHServer(
                    host=node.ip,
                    port=0,
                    admin_user=JOB_SSH_USER,
                    authorized_keys=service.public_keys,
                    allowed_forward_hosts={node.ip, "127.0.0.1"},
                    host_key=None,  # a new container: a new host key
                    network=network,
                    compute=compute,
                )
                try:
                    await server.start()
                except Exception as exc:  # a failed service must not kill the job
                    logger.exception(
                        "could not start job service %r of %s rank %d",
                        service.name,
                        job.name,
                        node.rank,
                    )
                    instance.error = f"the SSH daemon did not start: {exc}"
                else:
                    instance.server = server
                started.append(instance)
                self._by_id[instance.id] = instance

    async def stop(self, job_name: str) -> None:
        """Close a job's relays and daemons and forget its instances (idempotent).

        Parameters
        ----------
        job_name
            The job.
        """
        self._declared.pop(job_name, None)
        instances = self._by_job.pop(job_name, [])
        for instance in instances:
            self._by_id.pop(instance.id, None)
        # The daemons first: their SSH disconnect still reaches the clients through the relays.
        for instance in instances:
            if instance.server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(instance.server.close(), CLOSE_TIMEOUT)
        for relay in [r for r in self._relays if r.instance.job.name == job_name]:
            relay.close(1001, "the job ended")

    async def close(self) -> None:
        """Close every relay and daemon (emulator shutdown)."""
        for name in list(self._by_job):
            await self.stop(name)
        for relay in list(self._relays):
            relay.close(1001, "the emulator is stopping")
        self._declared.clear()

    # ----------------------------------------------------------------- reports
    def _running(self, instance: ServiceInstance) -> bool:
        job = instance.job
        return (
            instance.server is not None
            and not job.is_terminal
            and job.start_time is not None
            and time.time() >= job.start_time + self.delay
        )

    def instances(self, job: JobRecord, node_index: int, ws_base: str) -> dict[str, Any]:
        """The run-history ``serviceinstances/{nodeIndex}`` body of a job.

        Parameters
        ----------
        job
            The job.
        node_index
            Node rank.
        ws_base
            ``ws://host:port`` (``wss://`` over HTTPS) of the emulator.

        Returns
        -------
        dict
            ``{"instances": {name: ServiceInstanceResult}}``: the node's SSH
            services (``Starting`` until the daemon has run for the delay, then
            ``Running`` with a ``ProxyEndpoint``); empty when the job has ended
            or declared none for the node.
        """
        out: dict[str, Any] = {}
        if job.is_terminal or not 0 <= node_index < job.instance_count:
            return {"instances": out}
        started = {(i.rank, i.name): i for i in self._by_job.get(job.name, [])}
        for service in self._declared.get(job.name, ()):
            if not service.on_node(node_index):
                continue
            instance = started.get((node_index, service.name))
            entry: dict[str, Any] = {
                "type": "SSH",
                "port": SSH_SERVICE_PORT,
                "status": "Starting",
                "error": None,
                "endpoint": None,
                "properties": {},
            }
            if instance is not None and instance.error is not None:
                entry["status"] = "Failed"
                entry["error"] = {"error": {"code": "ServiceError", "message": instance.error}}
            elif instance is not None:
                entry["properties"]["ProxyEndpoint"] = f"{ws_base}/jobservice/{instance.id}"
                if self._running(instance):
                    entry["status"] = "Running"
            out[service.name] = entry
        return {"instances": out}

    def declare(self, job_name: str, services: Iterable[SshServiceSpec]) -> None:
        """Record a job's SSH services at submit, so they report ``Starting`` until they run.

        Parameters
        ----------
        job_name
            The job.
        services
            Its declared SSH services.
        """
        declared = tuple(services)
        if declared:
            self._declared[job_name] = declared

    def daemons(self, job_name: str) -> list[dict[str, Any]]:
        """The daemons of a running job, for tests and debugging.

        Parameters
        ----------
        job_name
            The job.

        Returns
        -------
        list of dict
            ``rank, service, ip, port, host_public_key`` per daemon (none once the job ended).
        """
        return [
            {
                "rank": i.rank,
                "service": i.name,
                "ip": i.ip,
                "port": i.port,
                "host_public_key": None if i.server is None else i.server.host_public_key,
            }
            for i in self._by_job.get(job_name, [])
        ]

    # ------------------------------------------------------------------ proxy
    def authorize(self, instance_id: str, authorization: str | None) -> ServiceInstance:
        """Check a proxy request; return the instance it may reach.

        Parameters
        ----------
        instance_id
            The id in the ProxyEndpoint path.
        authorization
            The request's ``Authorization`` header.

        Returns
        -------
        ServiceInstance
            A running instance the caller owns.

        Raises
        ------
        ApiError
            401 without an ARM token of the emulated tenant; 404 for an unknown
            instance or one not ``Running``; 403 when the caller is not the
            job's owner (a job submitted without an acceptable token has no
            recorded owner: any valid token may connect).
        """
        claims = identity.bearer_claims(authorization)
        if claims is None:
            raise ApiError(
                401,
                "Unauthorized",
                "A bearer token of the workspace's tenant for "
                "https://management.core.windows.net/.default is required.",
            )
        instance = self._by_id.get(instance_id)
        if instance is None:
            raise ApiError(404, "NotFound", "No such job service instance.")
        owner = instance.job.owner
        if owner is not None and claims.get("oid") != owner:
            raise ApiError(
                403,
                "Forbidden",
                f"Only the owner of job {instance.job.name} may connect to its services.",
            )
        if not self._running(instance):
            raise ApiError(
                404,
                "NotFound",
                f"Job service {instance.name!r} of {instance.job.name} node {instance.rank} "
                "is not running.",
            )
        return instance


class JobServiceProxyHandler(tornado.websocket.WebSocketHandler):
    """``/jobservice/{id}/nbip/v1.0/ws-tcp``: binary frames <-> a TCP connection to the daemon."""

    services: JobServices
    instance: ServiceInstance

    def initialize(self, services: JobServices) -> None:
        """Receive the emulator's job services.

        Parameters
        ----------
        services
            Registry of the daemons.
        """
        self.services = services
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None

    def prepare(self) -> None:
        """Refuse the upgrade (401/403/404 JSON) unless the caller may reach a running daemon."""
        try:
            self.instance = self.services.authorize(
                self.path_kwargs["sid"], self.request.headers.get("Authorization")
            )
        except ApiError as exc:
            self.set_status(exc.status)
            if exc.status == 401:
                self.set_header("WWW-Authenticate", "Bearer")
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps(arm_error(exc.code, exc.message)))

    async def open(self, *args: str, **kwargs: str) -> None:
        """Connect to the daemon (bounded) and start relaying its bytes to the client."""
        instance = self.instance
        self.services._relays.add(self)
        # Interactive SSH through it: no Nagle delay on small frames (tornado's default keeps
        # it, adding ~40 ms per round trip against delayed ACKs: WebSocketHandler.set_nodelay)
        self.set_nodelay(True)
        try:
            sock = await instance.network.connect(
                instance.compute, instance.ip, instance.port or 0, CONNECT_TIMEOUT
            )
            reader, self._writer = await asyncio.open_connection(sock=sock)
        except (OSError, asyncio.TimeoutError) as exc:
            logger.debug("job service %s: cannot reach the daemon: %s", instance.id, exc)
            self.close(1011, "cannot reach the node's SSH daemon")
            return
        if self.ws_connection is None or self.ws_connection.is_closing():
            self._writer.close()  # closed meanwhile (the job ended, the client left)
            self._writer = None
            return
        self._pump = asyncio.ensure_future(self._downstream(reader))

    async def _downstream(self, reader: asyncio.StreamReader) -> None:
        """Daemon -> client, until the daemon hangs up or the WebSocket closes."""
        try:
            while data := await reader.read(CHUNK):
                await self.write_message(data, binary=True)
        except (
            ConnectionError,
            tornado.websocket.WebSocketClosedError,
            tornado.iostream.StreamClosedError,
        ):
            pass
        finally:
            self.close(1000, "the SSH connection closed")

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Client -> daemon; text frames are refused (the connection is closed).

        Tornado reads the next frame once an awaitable returned here is done:
        one is returned only while the daemon lags (no coroutine per frame).
        """
        if isinstance(message, str):
            self.close(1003, "only binary frames are accepted")
            return None
        writer = self._writer
        if writer is None or writer.is_closing():
            return None
        writer.write(message)
        return self._drain(writer) if writer.transport.get_write_buffer_size() else None

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.drain()
        except ConnectionError:
            self.close(1011, "the SSH daemon closed the connection")

    def on_close(self) -> None:
        """Close the daemon side and forget the relay."""
        self.services._relays.discard(self)
        if self._pump is not None:
            self._pump.cancel()
        if self._writer is not None:  # half-close, as a TCP proxy does: the daemon still
            # answers what reached it (channel closes) and hangs up on the client's DISCONNECT;
            # a full close made it write into a reset socket ("socket.send() raised exception.")
            writer, self._writer = self._writer, None
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
                asyncio.get_running_loop().call_later(CONNECT_TIMEOUT, writer.close)
            else:
                writer.close()


def jobservice_routes(services: JobServices) -> list[Any]:
    """Tornado routes of the job-service proxy.

    Parameters
    ----------
    services
        The emulator's job services.

    Returns
    -------
    list
        ``[(pattern, JobServiceProxyHandler, kwargs)]``.
    """
    return [
        (
            r"/jobservice/(?P<sid>[A-Za-z0-9_\-]+)" + PROXY_PATH.replace(".", r"\."),
            JobServiceProxyHandler,
            {"services": services},
        )
    ]
