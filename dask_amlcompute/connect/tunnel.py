"""SSH tunnel from a Dask client to a scheduler on an AmlCompute node.

A client outside the compute's VNet cannot dial the scheduler's private
address. :class:`SSHTunnel` logs in to the node's public SSH endpoint with
:mod:`asyncssh` (in-process: no ``ssh`` subprocess, no key written anywhere),
verifies the host key against ``known_hosts``, and serves one local port on
``127.0.0.1`` per target; each local connection is piped through its own
``direct-tcpip`` channel. A dropped SSH connection is re-established in the
background with bounded retries, and the local ports stay the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from ..exceptions import (
    ConfigurationError,
    ForwardingError,
    HostKeyError,
    TunnelAuthenticationError,
    TunnelError,
    TunnelUnreachableError,
)
from .hostkeys import HostKeyChecker, KeyLike, key_fingerprint, resolve_client_keys

__all__ = ["SSHTunnel"]

logger = logging.getLogger(__name__)

#: Seconds allowed for each phase of :meth:`SSHTunnel.close`.
CLOSE_TIMEOUT = 5.0
#: Longest pause between two reconnection attempts, in seconds.
MAX_RECONNECT_DELAY = 10.0
#: Cipher preference: asyncssh's AES-GCM is much faster than its chacha20 on AES-NI CPUs.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")
_DEFAULT_KNOWN_HOSTS = Path("~", ".ssh", "known_hosts")


class _LocalSide(asyncssh.SSHForwarder):
    """Local end of one forwarded connection; asyncssh pipes it to its channel once open.

    Reading pauses until the channel is open, but Python before 3.11.4 ignores a pause
    made in ``connection_made`` (CPython gh-103607) and hands over the first bytes (the
    Dask handshake) at once: those are held and sent first, in order, once it opens.
    """

    def __init__(self, tunnel: SSHTunnel, name: str) -> None:
        super().__init__()
        self._tunnel, self.name, self.closed = tunnel, name, False
        self._early: list[bytes] | None = []  # until the channel opens; b"" marks an EOF

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pause_reading()  # resumed when the channel is open
        self._tunnel._spawn(self._tunnel._forward(self))

    def data_received(self, data: bytes, datatype: int | None = None) -> None:
        if self._early is None:
            super().data_received(data, datatype)
        else:
            self._early.append(data)

    def eof_received(self) -> bool:
        if self._early is None:
            return super().eof_received()
        self._early.append(b"")
        return True  # half-open until the channel passes the EOF on

    def channel_open(self) -> None:
        """The channel is open: send what came early, then read on."""
        early, self._early = self._early or [], None
        for data in early:
            if data:
                self.data_received(data)
            else:
                self.eof_received()
        self.resume_reading()

    def close(self) -> None:  # by the local socket, its channel or the tunnel
        self.closed = True
        super().close()


class SSHTunnel:
    """Forward local ports on ``127.0.0.1`` to addresses behind an SSH server.

    Parameters
    ----------
    ssh_host, ssh_port
        The node's public SSH endpoint (``publicIpAddress``, ``port``).
    username
        The compute's admin user.
    client_keys
        Keys to log in with, see :func:`resolve_client_keys`; ``None`` uses
        the default ``~/.ssh`` keys and the ssh-agent, like OpenSSH. Given
        keys are used alone (like ``IdentitiesOnly``). ``~/.ssh/config`` is
        never read.
    known_hosts
        ``None``: ``~/.ssh/known_hosts``. A path: that file. A sequence:
        OpenSSH public host keys (``"ssh-ed25519 AAAA..."``) trusted for
        this host, and no others, in memory.
    trust_on_first_use
        Accept a host key when ``known_hosts`` has no entry for the host, and
        log its fingerprint: appended to the ``known_hosts`` file, or (a
        sequence) kept in memory for this tunnel's reconnections. A key that
        differs from a recorded one is always refused.
    targets
        Name of each forward and the address the SSH server connects it to.
    reconnect_attempts
        Attempts to re-establish a dropped connection before giving up.
    connect_timeout
        Seconds allowed to connect and log in, and to open each channel.
    reconnect_delay
        Pause before the first reconnection attempt, doubled after each.
    host_key_alias
        Name the host key is looked up and recorded under, instead of
        ``[ssh_host]:ssh_port``: one per node (``aml-<compute>-<nodeId>``),
        because AML's public SSH endpoint is a shared load-balancer IP with a
        per-node port, and a new VM behind the same port has a new host key.
    dial
        Opens what the SSH connection runs over, once per (re)connection: an
        ``asyncssh.connect(tunnel=)`` object (e.g. a WebSocket proxy's, see
        :mod:`~dask_amlcompute.connect.proxy`); default: TCP to ``ssh_host:ssh_port``.
    """

    def __init__(
        self,
        ssh_host: str,
        ssh_port: int = 22,
        username: str = "azureuser",
        client_keys: KeyLike | Sequence[KeyLike] | None = None,
        known_hosts: str | os.PathLike | Sequence[str] | None = None,
        trust_on_first_use: bool = False,
        targets: Mapping[str, tuple[str, int]] | None = None,
        reconnect_attempts: int = 5,
        connect_timeout: float = 15,
        reconnect_delay: float = 0.5,
        host_key_alias: str | None = None,
        dial: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        if not targets:
            raise ConfigurationError("SSHTunnel needs targets, e.g. {'scheduler': (ip, 8786)}")
        self.ssh_host, self.ssh_port, self.username = ssh_host, int(ssh_port), username
        self.targets = {name: (str(h), int(p)) for name, (h, p) in targets.items()}
        self.trust_on_first_use = trust_on_first_use
        self.reconnect_attempts, self.reconnect_delay = int(reconnect_attempts), reconnect_delay
        self.connect_timeout = float(connect_timeout)
        self.reconnects = 0
        self._keys = resolve_client_keys(client_keys)
        self._dial = dial
        # the name and port host keys are looked up under: the alias alone (port 22), if set
        self._host, self._kport = (host_key_alias, 22) if host_key_alias else (ssh_host, ssh_port)
        self._pattern = self._host if self._kport == 22 else f"[{self._host}]:{self._kport}"
        self._trusted: list[str] = []  # known_hosts lines held in memory
        if known_hosts is None or isinstance(known_hosts, (str, os.PathLike)):
            self._file: Path | None = Path(known_hosts or _DEFAULT_KNOWN_HOSTS).expanduser()
        else:
            self._file = None
            for text in known_hosts:
                try:
                    self._trust(asyncssh.import_public_key(text))
                except (asyncssh.KeyImportError, ValueError) as exc:
                    msg = f"known_hosts entry {text!r} is not an OpenSSH public key"
                    raise ConfigurationError(msg) from exc
        self._label = f"{username}@{ssh_host}:{self.ssh_port}" + (
            f" (host key alias {host_key_alias})" if host_key_alias else ""
        )
        self._conn: asyncssh.SSHClientConnection | None = None
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._ports: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._settled = asyncio.Event()  # set while connected, after giving up, and once closed
        #: Why the tunnel gave up reconnecting (None while it is up or reconnecting).
        self.failure: TunnelError | None = None
        self._closed = self._ending = False

    def _trust(self, key: asyncssh.SSHKey) -> str:
        text = " ".join(key.export_public_key().decode("ascii").split()[:2])
        self._trusted.append(f"{self._pattern} {text}")
        return self._trusted[-1]

    def _record_host_key(self, key: asyncssh.SSHKey) -> None:
        """Trust ``key`` from now on and append it to the known_hosts file (if recording)."""
        line, path = self._trust(key), self._file
        if path is None:
            logger.info("Trusting the SSH host key %s of %s for this session (kept in memory)",
                        key.get_fingerprint(), self._label)  # fmt: skip
            return
        logger.warning("Trusting the SSH host key %s of %s on first use; recording it in %s",
                       key.get_fingerprint(), self._label, path)  # fmt: skip
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            old = path.read_bytes() if path.is_file() else b""
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="ascii") as f:
                f.write(("\n" if old and not old.endswith(b"\n") else "") + line + "\n")
        except OSError as exc:
            logger.warning("Could not record the host key in %s: %s", path, exc)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        """Open one authenticated SSH connection; failures become typed errors."""
        known = asyncssh.SSHKnownHosts()
        try:
            if self._file is not None and self._file.is_file():
                known.load(self._file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"Cannot read the known_hosts file {self._file} to verify {self._label}: {exc}"
            raise HostKeyError(msg) from exc
        known.load("\n".join(self._trusted))
        checker = HostKeyChecker(known, self.trust_on_first_use)
        where = self._file or "the host keys passed as known_hosts"
        defaults = self._keys is None
        options = dict(
            username=self.username, client_factory=lambda: checker, known_hosts=known,
            config=None, client_keys=() if defaults else self._keys,
            agent_path=() if defaults else None, password_auth=False, kbdint_auth=False,
            gss_auth=False, gss_kex=False, encryption_algs=[*CIPHERS, "aes128-ctr", "aes256-ctr"],
            compression_algs=None, connect_timeout=self.connect_timeout,
            keepalive_interval=15, keepalive_count_max=3,
        )  # fmt: skip
        try:
            conn = await asyncio.wait_for(self._login(options), self.connect_timeout + 5)
        except (asyncssh.HostKeyNotVerifiable, asyncssh.KeyExchangeFailed) as exc:
            recorded = bool(
                known.match(self._host, "", None if self._kport == 22 else self._kport)[0]
            )
            if isinstance(exc, asyncssh.KeyExchangeFailed) and not recorded:
                raise TunnelError(f"SSH key exchange with {self._label} failed: {exc}") from exc
            fp = checker.offered.get_fingerprint() if checker.offered else "(not offered)"
            if checker.host_known or recorded:
                raise HostKeyError(
                    f"The SSH host key of {self._label} ({fp}) does not match the one in "
                    f"{where}: possible man-in-the-middle attack, or the node was re-created. "
                    "Verify the fingerprint out of band before replacing the stale entry."
                ) from exc
            raise HostKeyError(
                f"The SSH host key of {self._label} is not in known_hosts ({where}); verify "
                f"the fingerprint {fp} and pass trust_on_first_use=True or add it."
            ) from exc
        except asyncssh.PermissionDenied as exc:
            tried = ", ".join(key_fingerprint(k) for k in self._keys or []) or "~/.ssh, agent"
            raise TunnelAuthenticationError(
                f"SSH login {self._label} was refused (keys tried: {tried}): the compute's admin "
                "user does not accept this key; pass ssh_key= or add the key when creating the "
                "compute."
            ) from exc
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
            hint = (
                "The job's SSH service is not running (any more)."
                if self._dial is not None
                else "The compute has no public SSH access or the node has no public IP; create "
                "the compute with remote login enabled or run the client on the same VNet (e.g. "
                "an AML compute instance)."
            )
            raise TunnelUnreachableError(
                f"Cannot reach the SSH endpoint {self._label}: {exc or type(exc).__name__}. {hint}"
            ) from exc
        if checker.accepted_new and checker.offered is not None:
            self._record_host_key(checker.offered)
        return conn

    async def _login(self, options: dict[str, Any]) -> asyncssh.SSHClientConnection:
        """Dial (the given way, or TCP) and log in; host keys are matched per ``self._host``."""
        if self._dial is not None:
            way: dict[str, Any] = {"tunnel": await self._dial()}
        else:
            address = (self.ssh_host, self.ssh_port)
            way = {"sock": await asyncio.to_thread(
                socket.create_connection, address, self.connect_timeout)}  # fmt: skip
        try:
            return await asyncssh.connect(self._host, self._kport, **way, **options)
        except BaseException:
            next(iter(way.values())).close()
            raise

    async def _open_channel(
        self, conn: asyncssh.SSHClientConnection, name: str, factory: Callable[[], Any]
    ) -> asyncssh.SSHTCPChannel[bytes]:
        """Open a ``direct-tcpip`` channel to target ``name`` whose session ``factory`` makes."""
        host, port = self.targets[name]
        try:
            coro = conn.create_connection(factory, host, port)
            chan, _ = await asyncio.wait_for(coro, self.connect_timeout)
        except asyncssh.ChannelOpenError as exc:
            raise ForwardingError(
                f"The SSH server {self._label} refused to forward {name!r} to {host}:{port}: "
                f"{exc.reason}. A node forwards only to its own private IP; check the target."
            ) from exc
        return chan

    async def start(self) -> None:
        """Connect, check that each target can be forwarded, and open the local ports.

        Raises
        ------
        TunnelUnreachableError, TunnelAuthenticationError, HostKeyError, ForwardingError
            With a message saying what to change.
        """
        loop = asyncio.get_running_loop()
        try:
            self._conn = await self._connect()
            for name in self.targets:  # fail now rather than when the client connects
                try:
                    (await self._open_channel(self._conn, name, asyncssh.SSHTCPSession)).close()
                except ForwardingError as exc:  # raised from the server's ChannelOpenError
                    if getattr(exc.__cause__, "code", None) != asyncssh.OPEN_CONNECT_FAILED:
                        raise
                    logger.debug("Nothing listens behind %r yet: %s", name, exc)
                factory = lambda name=name: _LocalSide(self, name)  # noqa: E731
                self._servers[name] = server = await loop.create_server(factory, "127.0.0.1", 0)
                self._ports[name] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.close()
            raise
        self._settled.set()
        self._spawn(self._supervise())
        logger.debug("SSH tunnel %s open: %s", self._label, self._ports)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        """Forget a finished task; an error in it is logged (never left unretrieved)."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("SSH tunnel %s: %s failed", self._label, task.get_coro(),
                           exc_info=task.exception())  # fmt: skip

    async def _forward(self, local: _LocalSide) -> None:
        """Connect an accepted local connection to its target through the SSH connection."""
        try:
            if not self._settled.is_set():  # reconnecting: wait, bounded
                await asyncio.wait_for(self._settled.wait(), self.connect_timeout)
            if self._conn is None:
                raise self.failure or TunnelError("the SSH connection is being re-established")
            remote = lambda: asyncssh.SSHForwarder(local)  # noqa: E731
            chan = await self._open_channel(self._conn, local.name, remote)
        except (Exception, asyncio.CancelledError) as exc:
            # while the cluster closes, the client's reconnect attempts are expected to fail
            log = logger.debug if self._ending or self._closed else logger.warning
            log("SSH tunnel %s cannot forward a connection to %r: %s", self._label, local.name, exc)
            local.close()
            return
        if local.closed:
            chan.close()
        else:
            local.channel_open()

    async def _supervise(self) -> None:
        """Wait for the connection to drop, then re-establish it with bounded retries."""
        while self._conn is not None:
            await self._conn.wait_closed()
            if self._closed or self._ending:
                return
            self._conn = None
            error: TunnelError | None = None
            self._settled.clear()
            logger.warning(
                "SSH connection %s dropped; reconnecting (%d attempts). The connections through "
                "it were cut: a Dask client reconnects by itself once the tunnel is back, but "
                "distributed cancels the futures it had pending (FutureCancelledError "
                "'scheduler-connection-lost'): submit them again.",
                self._label, self.reconnect_attempts,
            )  # fmt: skip
            for attempt in range(self.reconnect_attempts):
                await asyncio.sleep(min(self.reconnect_delay * 2**attempt, MAX_RECONNECT_DELAY))
                try:
                    self._conn = await self._connect()
                except (HostKeyError, TunnelAuthenticationError) as exc:
                    error = exc  # retrying cannot help
                    break
                except Exception as exc:  # a TunnelError, or anything else: try again, bounded
                    error = exc if isinstance(exc, TunnelError) else TunnelError(repr(exc))
                    logger.warning("Reconnection attempt %d/%d to %s failed: %s",
                                   attempt + 1, self.reconnect_attempts, self._label, exc)  # fmt: skip
                    continue
                self.reconnects += 1
                logger.warning("SSH connection %s re-established; local ports unchanged: %s",
                               self._label, self._ports)  # fmt: skip
                break
            if self._conn is None:
                self.failure = error or TunnelError("reconnect_attempts is 0")
                logger.error("SSH tunnel %s gave up reconnecting: %s. Connections through it "
                             "now fail; recreate the tunnel (or the cluster's connection).",
                             self._label, self.failure)  # fmt: skip
            self._settled.set()

    def local_address(self, name: str) -> tuple[str, int]:
        """Return the local ``(host, port)`` that forwards to target ``name``."""
        if name not in self._ports:
            raise KeyError(f"No open local port for {name!r}; targets: {sorted(self.targets)}")
        return "127.0.0.1", self._ports[name]

    def expect_end(self) -> None:
        """The far end is about to go away (the cluster is closing): don't reconnect then."""
        self._ending = True

    async def close(self) -> None:
        """Close the local ports, connections and SSH connection (idempotent; bounded waits)."""
        if self._closed:
            return
        self._closed = True
        self._settled.set()
        servers, self._servers, self._ports = list(self._servers.values()), {}, {}
        tasks, conn, self._conn = list(self._tasks), self._conn, None
        for server in servers:
            server.close()
        for task in tasks:
            task.cancel()
        if conn is not None:
            conn.close()
        waits: list[Awaitable[Any]] = [asyncio.gather(*tasks, return_exceptions=True)]
        waits += [s.wait_closed() for s in servers] + ([conn.wait_closed()] if conn else [])
        try:
            await asyncio.wait_for(asyncio.gather(*waits), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            logger.debug("SSH tunnel %s did not close within %s s", self._label, CLOSE_TIMEOUT)

    async def __aenter__(self) -> SSHTunnel:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
