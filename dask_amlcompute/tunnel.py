"""SSH tunnel from a Dask client to a scheduler on an AmlCompute node.

A client outside the compute's VNet cannot dial the scheduler's private
address. :class:`SSHTunnel` logs in to the node's public SSH endpoint with
:mod:`asyncssh` (in-process: no ``ssh`` subprocess, no key written anywhere),
verifies the host key against ``known_hosts``, and serves one local port on
``127.0.0.1`` per target. Each local connection is piped through its own
``direct-tcpip`` channel. If the SSH connection drops, it is re-established
in the background with bounded retries while the local ports stay the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import asyncssh

from .exceptions import AmlComputeError, ConfigurationError

__all__ = [
    "ForwardingError",
    "HostKeyError",
    "SSHTunnel",
    "TunnelAuthenticationError",
    "TunnelError",
    "TunnelUnreachableError",
    "resolve_client_keys",
]

logger = logging.getLogger(__name__)

KeyLike = Union[str, bytes, os.PathLike, asyncssh.SSHKey, asyncssh.SSHKeyPair]
#: Seconds allowed for each phase of :meth:`SSHTunnel.close`.
CLOSE_TIMEOUT = 5.0
#: Longest pause between two reconnection attempts, in seconds.
MAX_RECONNECT_DELAY = 10.0
# AES-GCM is markedly faster than asyncssh's chacha20 on AES-NI hardware.
_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
            "aes128-ctr", "aes192-ctr", "aes256-ctr"]  # fmt: skip
_REMEDY_UNREACHABLE = (
    "The compute has no public SSH access or the node has no public IP; create the compute "
    "with remote login enabled (an admin user with an SSH key) or run the client on the same "
    "VNet (e.g. an AML compute instance)."
)


class TunnelError(AmlComputeError, ConnectionError):
    """The SSH tunnel to the scheduler's node could not be opened or kept open."""


class TunnelUnreachableError(TunnelError):
    """The node's SSH endpoint refused the connection or did not answer in time."""


class TunnelAuthenticationError(TunnelError):
    """The node's SSH server did not accept any of the client keys."""


class HostKeyError(TunnelError):
    """The node's SSH host key is unknown or does not match ``known_hosts``."""


class ForwardingError(TunnelError):
    """The SSH server refused to forward to a target address."""


def _host_pattern(host: str, port: int) -> str:
    """Return the ``known_hosts`` pattern OpenSSH uses for ``host:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def _key_text(key: asyncssh.SSHKey) -> str:
    """Return ``"<type> <base64>"`` for a public key (no comment)."""
    return " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])


def resolve_client_keys(
    client_keys: KeyLike | Sequence[KeyLike] | None = None, passphrase: str | None = None
) -> list[asyncssh.SSHKey | asyncssh.SSHKeyPair] | None:
    """Load the private keys to log in with.

    Parameters
    ----------
    client_keys : str, bytes, path, asyncssh key, or a sequence of them, optional
        Each item is a path to a private key file (``~`` is expanded), the
        text of a private key (OpenSSH/PEM/PuTTY), or an already loaded
        :class:`asyncssh.SSHKey` / :class:`asyncssh.SSHKeyPair` (e.g. from an
        agent). ``None`` means the OpenSSH defaults: ``~/.ssh/id_ed25519``,
        ``~/.ssh/id_rsa``, ... and the keys of the running ``ssh-agent``.
    passphrase : str, optional
        Passphrase of encrypted key files or texts.

    Returns
    -------
    list or None
        The loaded keys, or ``None`` for the defaults (loaded by asyncssh on
        each connection).

    Raises
    ------
    ConfigurationError
        If a file is missing or unreadable, a key cannot be parsed, an
        encrypted key has no passphrase, or the sequence is empty.

    Examples
    --------
    >>> resolve_client_keys() is None
    True
    """
    if client_keys is None:
        return None
    single = (str, bytes, os.PathLike, asyncssh.SSHKey, asyncssh.SSHKeyPair)
    items = [client_keys] if isinstance(client_keys, single) else list(client_keys)
    if not items:
        raise ConfigurationError("client_keys is empty; pass None to use ~/.ssh keys and ssh-agent")
    keys: list[asyncssh.SSHKey | asyncssh.SSHKeyPair] = []
    for item in items:
        if isinstance(item, (asyncssh.SSHKey, asyncssh.SSHKeyPair)):
            keys.append(item)
            continue
        is_text = isinstance(item, bytes) or (
            isinstance(item, str) and ("PRIVATE KEY" in item or "PuTTY-User-Key" in item)
        )
        what = "the given key text" if is_text else f"the key file {item}"
        try:
            if is_text:
                keys.append(asyncssh.import_private_key(item, passphrase))  # type: ignore[arg-type]
            else:
                path = Path(os.fspath(item)).expanduser()  # type: ignore[arg-type]
                keys.append(asyncssh.read_private_key(path, passphrase))
        except OSError as exc:
            raise ConfigurationError(f"Cannot read {what}: {exc}") from exc
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigurationError(
                f"Cannot load {what}: {exc}. Pass an unencrypted private key, its passphrase, "
                "or client_keys=None to use the ssh-agent."
            ) from exc
    return keys


class _HostKeyChecker(asyncssh.SSHClient):
    """Per-connection client that records why a host key was not trusted."""

    def __init__(self, known: asyncssh.SSHKnownHosts, tofu: bool) -> None:
        self._known, self._tofu = known, tofu
        self.offered: asyncssh.SSHKey | None = None
        self.host_known = False
        self.accepted_new = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        # Called by asyncssh only for keys that known_hosts does not trust.
        self.offered = key
        matches = self._known.match(host, addr, None if port == 22 else port)
        self.host_known = bool(matches[0] or matches[1])
        self.accepted_new = self._tofu and not self.host_known
        return self.accepted_new


class _RemoteSide(asyncssh.SSHTCPSession[bytes]):
    """Channel end of one forwarded connection: writes into the local socket."""

    def __init__(self, local: _LocalSide) -> None:
        self._local = local

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._local.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        transport = self._local.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._local.transport is not None:
            self._local.transport.close()

    def pause_writing(self) -> None:
        self._local.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self._local.transport.resume_reading()  # type: ignore[union-attr]


class _LocalSide(asyncio.Protocol):
    """Local end of one forwarded connection: writes into its SSH channel."""

    def __init__(self, tunnel: SSHTunnel, name: str) -> None:
        self._tunnel, self.name = tunnel, name
        self.transport: asyncio.Transport | None = None
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]  # until the channel is open
        self._tunnel._attach(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.chan.write(data)  # type: ignore[union-attr]
        except (BrokenPipeError, OSError, asyncssh.Error):
            self.transport.abort()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        try:
            self.chan.write_eof()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError, asyncssh.Error):
            return False
        return True

    def pause_writing(self) -> None:
        if self.chan is not None:
            self.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.chan is not None:
            self.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._tunnel._locals.discard(self)
        if self.chan is not None:
            self.chan.close()


class SSHTunnel:
    """Forward local ports on ``127.0.0.1`` to addresses behind an SSH server.

    Parameters
    ----------
    ssh_host, ssh_port : str, int
        The node's public SSH endpoint (``publicIpAddress`` and ``port`` of
        ``compute.list_nodes()``).
    username : str
        The compute's admin user.
    client_keys : optional
        Keys to log in with; see :func:`resolve_client_keys` (``None``: the
        ``~/.ssh`` default keys and the ssh-agent, like OpenSSH).
    known_hosts : str, path or sequence of str, optional
        ``None``: ``~/.ssh/known_hosts``. A path: that ``known_hosts`` file.
        A sequence: OpenSSH public host keys (``"ssh-ed25519 AAAA..."``)
        trusted for this host, and no others.
    trust_on_first_use : bool
        Accept a host key when ``known_hosts`` has no entry for the host,
        append it to the ``known_hosts`` file (``known_hosts`` if it is a path,
        else ``~/.ssh/known_hosts``) and log its fingerprint as a warning. A key
        that differs from a recorded one is always refused.
    targets : mapping of str to (host, port)
        Name of each forward and the address the SSH server connects it to.
    reconnect_attempts : int
        Attempts to re-establish a dropped connection before giving up.
    connect_timeout : float
        Seconds allowed to connect and log in, and to open each channel.
    reconnect_delay : float
        First pause between reconnection attempts, doubled after each failure.
    passphrase : str, optional
        Passphrase of encrypted ``client_keys``.

    Examples
    --------
    >>> tunnel = SSHTunnel("20.1.2.3", 50000, "azureuser", known_hosts="~/.ssh/known_hosts",
    ...                    targets={"scheduler": ("10.0.0.4", 8786)})  # doctest: +SKIP
    >>> await tunnel.start()  # doctest: +SKIP
    >>> Client(tunnel.local_url("scheduler"), asynchronous=True)  # doctest: +SKIP
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
        passphrase: str | None = None,
    ) -> None:
        if not targets:
            raise ConfigurationError("SSHTunnel needs at least one target, e.g. {'scheduler': ...}")
        self.ssh_host, self.ssh_port, self.username = ssh_host, int(ssh_port), username
        self.targets = {name: (str(h), int(p)) for name, (h, p) in targets.items()}
        self._keys = resolve_client_keys(client_keys, passphrase)
        self._trusted: list[str] = []  # in-memory known_hosts lines
        self._known_hosts_file: Path | None = None
        if known_hosts is None or isinstance(known_hosts, (str, os.PathLike)):
            default = Path("~", ".ssh", "known_hosts")
            self._known_hosts_file = Path(os.fspath(known_hosts or default)).expanduser()
            self._record_to = self._known_hosts_file
        else:
            self._record_to = Path("~", ".ssh", "known_hosts").expanduser()
            for text in known_hosts:
                self._trust(self._parse_host_key(text))
        self.trust_on_first_use = trust_on_first_use
        self.reconnect_attempts, self.reconnect_delay = int(reconnect_attempts), reconnect_delay
        self.connect_timeout = float(connect_timeout)
        self.reconnects = 0
        self._conn: asyncssh.SSHClientConnection | None = None
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._ports: dict[str, int] = {}
        self._locals: set[_LocalSide] = set()
        self._tasks: set[asyncio.Task] = set()
        self._supervisor: asyncio.Task | None = None
        self._settled = asyncio.Event()  # set while connected, failed or closed
        self._failure: TunnelError | None = None
        self._started = self._closed = False
        self._label = f"{username}@{ssh_host}:{self.ssh_port}"

    @staticmethod
    def _parse_host_key(text: str) -> asyncssh.SSHKey:
        """Parse ``"<type> <base64>"`` (or a ``known_hosts`` line) into a public key."""
        fields = str(text).split()
        for candidate in (" ".join(fields), " ".join(fields[1:])):
            try:
                return asyncssh.import_public_key(candidate)
            except (asyncssh.KeyImportError, ValueError):
                continue
        raise ConfigurationError(f"known_hosts entry {text!r} is not an OpenSSH public key")

    def _trust(self, key: asyncssh.SSHKey) -> None:
        self._trusted.append(f"{_host_pattern(self.ssh_host, self.ssh_port)} {_key_text(key)}")

    def _load_known_hosts(self) -> asyncssh.SSHKnownHosts:
        known = asyncssh.SSHKnownHosts()
        path = self._known_hosts_file
        if path is not None and path.is_file():
            try:
                known.load(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"Cannot read known_hosts file {path}: {exc}") from exc
        known.load("\n".join(self._trusted))
        return known

    def _record_host_key(self, key: asyncssh.SSHKey) -> None:
        """Trust ``key`` for this tunnel and append it to the known_hosts file."""
        self._trust(key)
        path, line = self._record_to, self._trusted[-1]
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            needs_newline = path.is_file() and not path.read_bytes().endswith(b"\n")
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(("\n" if needs_newline and path.stat().st_size else "") + line + "\n")
        except OSError as exc:
            logger.warning("Could not record the host key in %s: %s", path, exc)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        """Open and authenticate one SSH connection, mapping failures to typed errors."""
        known = self._load_known_hosts()
        checker = _HostKeyChecker(known, self.trust_on_first_use)
        where = self._known_hosts_file or "the trusted host keys passed as known_hosts"
        default_keys = self._keys is None
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    self.ssh_host, self.ssh_port, username=self.username,
                    client_factory=lambda: checker, known_hosts=known, config=None,
                    client_keys=() if default_keys else self._keys,
                    agent_path=() if default_keys else None,
                    password_auth=False, kbdint_auth=False, gss_auth=False, gss_kex=False,
                    encryption_algs=_CIPHERS, compression_algs=None,
                    connect_timeout=self.connect_timeout, keepalive_interval=15,
                    keepalive_count_max=3,
                ),
                self.connect_timeout + 5,
            )  # fmt: skip
        except asyncssh.HostKeyNotVerifiable as exc:
            key = checker.offered
            fp = key.get_fingerprint() if key is not None else "(unknown)"
            if key is None:
                msg = f"The SSH host key of {self._label} was rejected ({exc.reason})."
            elif checker.host_known:
                msg = (f"The SSH host key of {self._label} ({fp}) does not match the one in "
                       f"{where}: possible man-in-the-middle attack, or the node was re-created. "
                       "Verify the fingerprint out of band before replacing the stale entry.")  # fmt: skip
            else:
                msg = (f"The SSH host key of {self._label} is not in known_hosts ({where}); "
                       f"verify the fingerprint {fp} and pass trust_on_first_use=True "
                       "or add it to known_hosts.")  # fmt: skip
            raise HostKeyError(msg) from exc
        except asyncssh.PermissionDenied as exc:
            tried = ("the default ~/.ssh keys and ssh-agent" if default_keys else
                     ", ".join(k.get_fingerprint() for k in self._keys or []))  # fmt: skip
            raise TunnelAuthenticationError(
                f"SSH login {self._label} was refused (tried {tried}): the compute's admin user "
                "does not accept this key; pass ssh_key= or add the key when creating the compute."
            ) from exc
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
            raise TunnelUnreachableError(
                f"Cannot reach the SSH endpoint {self._label}: {exc or type(exc).__name__}. "
                + _REMEDY_UNREACHABLE
            ) from exc
        if checker.accepted_new and checker.offered is not None:
            logger.warning(
                "Trusting new SSH host key of %s (%s) on first use; recorded in %s",
                self._label, checker.offered.get_fingerprint(), self._record_to,
            )  # fmt: skip
            self._record_host_key(checker.offered)
        return conn

    async def _open_channel(
        self, conn: asyncssh.SSHClientConnection, local: _LocalSide
    ) -> asyncssh.SSHTCPChannel[bytes]:
        host, port = self.targets[local.name]
        try:
            chan, _ = await asyncio.wait_for(
                conn.create_connection(lambda: _RemoteSide(local), host, port),
                self.connect_timeout,
            )
        except asyncssh.ChannelOpenError as exc:
            raise ForwardingError(
                f"The SSH server {self._label} refused to forward {local.name!r} to "
                f"{host}:{port}: {exc.reason}. The node forwards only to its own private IP "
                "where the scheduler listens; check the target address and port."
            ) from exc
        return chan

    async def start(self) -> None:
        """Connect, check that each target can be forwarded, and open the local ports.

        Raises
        ------
        TunnelUnreachableError, TunnelAuthenticationError, HostKeyError, ForwardingError
            With a message saying what to change.
        """
        if self._started:
            raise RuntimeError("SSHTunnel.start() can only be called once")
        self._started = True
        try:
            self._conn = await self._connect()
            for name in self.targets:  # probe: fail now rather than on the client's connect
                probe = _LocalSide(self, name)
                try:
                    (await self._open_channel(self._conn, probe)).close()
                except ForwardingError as exc:
                    if exc.__cause__.code != asyncssh.OPEN_CONNECT_FAILED:  # type: ignore[union-attr]
                        raise
                    logger.debug("Nothing listens yet behind %r: %s", name, exc)
            loop = asyncio.get_running_loop()
            for name in self.targets:
                server = await loop.create_server(
                    lambda name=name: _LocalSide(self, name), "127.0.0.1", 0
                )
                self._servers[name] = server
                self._ports[name] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.close()
            raise
        self._settled.set()
        self._supervisor = asyncio.ensure_future(self._supervise())
        logger.debug("SSH tunnel %s: %s", self._label, self._ports)

    def _attach(self, local: _LocalSide) -> None:
        """Start forwarding a newly accepted local connection."""
        self._locals.add(local)
        task = asyncio.ensure_future(self._forward(local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, local: _LocalSide) -> None:
        if not self._settled.is_set():  # reconnecting: wait a bounded time
            try:
                await asyncio.wait_for(self._settled.wait(), self.connect_timeout)
            except asyncio.TimeoutError:
                pass
        conn = self._conn
        if conn is None or local.closed:
            logger.warning("SSH tunnel %s is down; dropping a connection to %r%s", self._label,
                           local.name, f": {self._failure}" if self._failure else "")  # fmt: skip
            local.transport.abort()  # type: ignore[union-attr]
            return
        try:
            chan = await self._open_channel(conn, local)
        except (TunnelError, asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            logger.warning("SSH tunnel %s: cannot forward %r: %s", self._label, local.name, exc)
            local.transport.abort()  # type: ignore[union-attr]
            return
        if local.closed:
            chan.close()
        else:
            local.chan = chan
            local.transport.resume_reading()  # type: ignore[union-attr]

    async def _supervise(self) -> None:
        """Wait for the connection to drop, then re-establish it (bounded retries)."""
        while self._conn is not None:
            await self._conn.wait_closed()
            if self._closed:
                return
            self._conn = None
            self._settled.clear()
            error: TunnelError | None = None
            for attempt in range(1, self.reconnect_attempts + 1):
                delay = min(self.reconnect_delay * 2 ** (attempt - 1), MAX_RECONNECT_DELAY)
                logger.warning("SSH connection %s dropped; reconnecting in %.1f s (attempt %d/%d)",
                               self._label, delay, attempt, self.reconnect_attempts)  # fmt: skip
                await asyncio.sleep(delay)
                try:
                    self._conn = await self._connect()
                except (HostKeyError, TunnelAuthenticationError) as exc:
                    error = exc  # permanent: retrying cannot help
                    break
                except TunnelError as exc:
                    error = exc
                    logger.warning("Reconnecting %s failed: %s", self._label, exc)
                    continue
                self.reconnects += 1
                logger.warning("SSH connection %s re-established; local ports unchanged: %s",
                               self._label, self._ports)  # fmt: skip
                break
            if self._conn is None:
                self._failure = error
                logger.error("SSH tunnel %s gave up reconnecting after %d attempt(s): %s. New "
                             "connections through it fail; recreate the tunnel or cluster.",
                             self._label, attempt, error)  # fmt: skip
            self._settled.set()

    def local_address(self, name: str) -> tuple[str, int]:
        """Return the local ``(host, port)`` that forwards to target ``name``."""
        if name not in self._ports:
            raise KeyError(f"No open local port for {name!r}; targets: {sorted(self.targets)}")
        return "127.0.0.1", self._ports[name]

    def local_url(self, name: str, protocol: str = "tcp") -> str:
        """Return ``"<protocol>://127.0.0.1:<port>"`` for target ``name``."""
        host, port = self.local_address(name)
        return f"{protocol}://{host}:{port}"

    async def close(self) -> None:
        """Close the local ports, forwarded connections and the SSH connection.

        Idempotent; every wait is bounded by ``CLOSE_TIMEOUT`` seconds.
        """
        if self._closed:
            return
        self._closed = True
        self._settled.set()
        servers, self._servers = list(self._servers.values()), {}
        self._ports = {}
        for server in servers:
            server.close()
        tasks = [t for t in (self._supervisor, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for local in list(self._locals):
            if local.transport is not None:
                local.transport.abort()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        waits = [asyncio.gather(*tasks, return_exceptions=True)]
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
