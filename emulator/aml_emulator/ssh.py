"""Per-node SSH endpoint of the local Azure ML emulator.

A real AmlCompute cluster with ``remoteLoginPortPublicAccess: Enabled`` exposes
each node's SSH daemon on a public IP and port; users log in as the compute's
admin user with a key, and dask-amlcompute opens a local port forward
(``direct-tcpip``) through it to reach the Dask scheduler on the node's private
IP.  :class:`NodeSSHServer` emulates exactly that endpoint with an in-process
:mod:`asyncssh` server:

* only ``admin_user`` may log in, and only with a public key listed in
  ``authorized_keys`` (password and keyboard-interactive auth are not offered);
* local port forwarding is allowed to the hosts in ``allowed_forward_hosts``
  (any port) and refused everywhere else;
* sessions (shell, exec, subsystems such as SFTP), remote port forwarding,
  agent and X11 forwarding are all refused;
* the host key is an in-memory ed25519 key unless one is given; nothing is
  written to disk.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Iterable
from typing import cast

import asyncssh
from asyncssh.forward import SSHForwarder

from .network import LoopbackNetwork, NodeNetwork

__all__ = ["NodeSSHServer", "generate_client_keypair", "generate_host_key"]

logger = logging.getLogger(__name__)

#: Seconds allowed for the server to connect to a forward target.
FORWARD_CONNECT_TIMEOUT = 10.0
#: Seconds allowed for each phase of :meth:`NodeSSHServer.close`.
CLOSE_TIMEOUT = 5.0
#: Seconds a client has to authenticate after connecting.
LOGIN_TIMEOUT = 30.0


def generate_host_key() -> asyncssh.SSHKey:
    """Generate a fresh in-memory ed25519 host key.

    Returns
    -------
    asyncssh.SSHKey
        A private key usable as ``host_key`` of :class:`NodeSSHServer`.
    """
    return asyncssh.generate_private_key("ssh-ed25519")


def generate_client_keypair(comment: str = "dask-amlcompute-emulator") -> tuple[str, str]:
    """Generate an ed25519 client key pair, for tests and demos.

    Parameters
    ----------
    comment
        Comment stored in the key and appended to the public key line.

    Returns
    -------
    tuple of str
        ``(private_key_openssh, public_key_openssh)``: the private key in OpenSSH
        format (unencrypted), and the public key as a single ``authorized_keys``
        line, without newline.
    """
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    private = key.export_private_key("openssh").decode("ascii")
    public = key.export_public_key("openssh").decode("ascii").strip()
    return private, public


def _normalize_host(host: str) -> str:
    """Return a canonical form of ``host`` for allow-list comparisons."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _load_host_key(host_key: asyncssh.SSHKey | str | bytes | None) -> asyncssh.SSHKey:
    """Return ``host_key`` as an :class:`asyncssh.SSHKey`, generating one if None."""
    if host_key is None:
        return generate_host_key()
    if isinstance(host_key, asyncssh.SSHKey):
        return host_key
    return asyncssh.import_private_key(host_key)


def _load_authorized_keys(lines: Iterable[str]) -> set[bytes]:
    """Parse OpenSSH public key lines into a set of raw public key blobs."""
    blobs: set[bytes] = set()
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            key = asyncssh.import_public_key(text)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ValueError(f"Invalid authorized key {text[:40]!r}...: {exc}") from exc
        blobs.add(key.public_data)
    return blobs


class _TargetForwarder(SSHForwarder):
    """Forward-target side of a tunnel: holds the target's bytes until the channel is ready.

    Reading is paused as soon as the TCP connection is made, so anything the
    target sends first (a Dask scheduler writes its handshake before the client
    speaks) stays in the kernel socket buffer until :class:`_ChannelForwarder`
    resumes it once the SSH channel session has started. Without this, bytes
    arriving before the channel is wired are written to a forwarder with no
    transport yet and silently dropped.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Python before 3.11.4 ignores this pause (CPython gh-103607), but the channel side
        # is wired as soon as the connection returns, before the loop reads anything
        self.pause_reading()


class _ChannelForwarder(SSHForwarder):
    """SSH channel side of a tunnel: starts the target's reading once the session runs."""

    def session_started(self) -> None:
        super().session_started()
        target = self._peer
        if target is None:  # the target went away before the channel opened
            self.close()
            return
        target.resume_reading()


class _NodeConnectionHandler(asyncssh.SSHServer):
    """Per-connection policy object created by :class:`NodeSSHServer`."""

    def __init__(self, owner: NodeSSHServer) -> None:
        self._owner = owner
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = "?"

    def _log(self, msg: str, *args: object) -> None:
        logger.debug("SSH %s [%s]: " + msg, self._owner._label, self._peer, *args, stacklevel=2)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._owner._connections.add(conn)
        self._log("connected")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._owner._connections.discard(self._conn)
        self._log("connection closed (%s)", exc or "clean")

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        ok = username == self._owner.admin_user and key.public_data in self._owner._authorized
        self._log("%s key for user %r %s", key.get_algorithm(), username, "ok" if ok else "refused")
        return ok

    def auth_completed(self) -> None:
        self._log("authenticated")

    def session_requested(self) -> bool:
        self._log("session (shell/exec/subsystem) refused")
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._log("remote forward %s:%s refused", listen_host, listen_port)
        return False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        if not self._owner.is_forward_allowed(dest_host):
            self._log("forward to %s:%s refused (host not allowed)", dest_host, dest_port)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"Forwarding to {dest_host} is not permitted on this node",
            )
        self._log("forward to %s:%s", dest_host, dest_port)
        assert self._conn is not None
        return self._connect(self._conn, dest_host, dest_port)

    async def _connect(
        self, conn: asyncssh.SSHServerConnection, host: str, port: int
    ) -> asyncssh.SSHTCPSession[bytes]:
        """Open the server side of a forward, bounded by ``FORWARD_CONNECT_TIMEOUT``.

        The target connection does not read until the SSH channel session has
        started (see :class:`_TargetForwarder`), so the time limit cannot open a
        window in which the target's first bytes are lost.
        """
        loop = asyncio.get_running_loop()
        owner = self._owner
        try:
            # dialled from the node's network (its namespace in isolated mode)
            sock = await owner.network.connect(owner.compute, host, port, FORWARD_CONNECT_TIMEOUT)
            _, target = await loop.create_connection(_TargetForwarder, sock=sock)
        except asyncio.TimeoutError:
            self._log("forward to %s:%s timed out", host, port)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, f"Timed out connecting to {host} port {port}"
            ) from None
        except OSError as exc:
            self._log("forward to %s:%s failed: %s", host, port, exc)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
        if conn.is_closed():
            target.close()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "SSH connection closed")
        # asyncssh serves its SSHForwarder as a TCP session (and casts it the same way)
        return cast(asyncssh.SSHTCPSession[bytes], _ChannelForwarder(target))


class NodeSSHServer:
    """In-process SSH endpoint of one emulated AmlCompute node.

    Parameters
    ----------
    host
        Address to listen on (loopback, e.g. ``"127.0.0.1"``).
    port
        Port to listen on; ``0`` picks a free port (see :attr:`port`).
    admin_user
        The only user name allowed to log in (the compute's admin user).
    authorized_keys
        OpenSSH public key lines (``"ssh-ed25519 AAAA... comment"``) allowed
        to log in as ``admin_user``. Blank lines and ``#`` comments are ignored.
    allowed_forward_hosts
        Hosts that local port forwards (``direct-tcpip``) may target, on any
        port. Everything else is refused.
    host_key
        Private host key (object or OpenSSH/PEM text). A fresh in-memory
        ed25519 key is generated when omitted.
    network, compute
        The network the server listens in and dials forwards from, and the
        compute whose network that is (default: this machine's loopback).
    public
        Listen in the emulator's own network instead of the compute's (a
        node's public SSH endpoint, reachable by the client); forwards are
        still dialled from the compute's network.

    Notes
    -----
    Sessions (shell, exec, SFTP) are refused: the library only ever forwards
    ports through the node, and a refused session gives a clear
    ``ChannelOpenError`` instead of pretending to run commands. Remote
    forwarding, agent and X11 forwarding are refused too.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_user: str = "azureuser",
        authorized_keys: Iterable[str] = (),
        allowed_forward_hosts: Iterable[str] = (),
        host_key: asyncssh.SSHKey | str | bytes | None = None,
        network: NodeNetwork | None = None,
        compute: str = "",
        public: bool = False,
    ) -> None:
        self.host = host
        self.public = public
        self.network: NodeNetwork = network if network is not None else LoopbackNetwork()
        self.compute = compute
        self.admin_user = admin_user
        self.allowed_forward_hosts = {_normalize_host(h) for h in allowed_forward_hosts}
        self._port = port
        self._authorized = _load_authorized_keys(authorized_keys)
        self._host_key = _load_host_key(host_key)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._closed = False
        self._label = f"{host}:{port}"

    @property
    def port(self) -> int:
        """The listening port (the requested port until :meth:`start` binds)."""
        return self._port

    @property
    def host_public_key(self) -> str:
        """The host public key as an OpenSSH ``"<type> <base64>"`` string."""
        text = self._host_key.export_public_key("openssh").decode("ascii")
        return " ".join(text.split()[:2])

    def known_hosts_line(self) -> str:
        """Return a ``known_hosts`` line for this endpoint.

        Returns
        -------
        str
            ``"[host]:port <type> <base64>"`` (plain ``host`` for port 22),
            without trailing newline.
        """
        pattern = self.host if self._port == 22 else f"[{self.host}]:{self._port}"
        return f"{pattern} {self.host_public_key}"

    def is_forward_allowed(self, dest_host: str) -> bool:
        """Return whether ``dest_host`` is in ``allowed_forward_hosts`` (IPs canonicalised)."""
        return _normalize_host(dest_host) in self.allowed_forward_hosts

    async def start(self) -> None:
        """Bind the listener and start accepting SSH connections.

        Raises
        ------
        RuntimeError
            If the server was already started or has been closed.
        OSError
            If the address cannot be bound.
        """
        if self._acceptor is not None or self._closed:
            raise RuntimeError("NodeSSHServer can only be started once")
        listen_in = None if self.public else self.compute  # None: the emulator's network
        sock = await self.network.listen(listen_in, self.host, self._port)
        self._acceptor = await asyncssh.create_server(
            lambda: _NodeConnectionHandler(self),
            sock=sock,
            server_host_keys=[self._host_key],
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            login_timeout=LOGIN_TIMEOUT,
        )
        self._port = int(self._acceptor.get_port())
        self._label = f"{self.host}:{self._port}"
        logger.debug(
            "SSH %s: listening for %r, forwards to %s",
            self._label,
            self.admin_user,
            sorted(self.allowed_forward_hosts),
        )

    async def close(self) -> None:
        """Stop listening and close every open connection and forward.

        Idempotent; each phase is bounded by ``CLOSE_TIMEOUT`` seconds, after
        which remaining connections are aborted.
        """
        self._closed = True
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.close()
        conns = list(self._connections)
        for conn in conns:
            conn.close()
        if conns:
            waiters = [asyncio.ensure_future(conn.wait_closed()) for conn in conns]
            _, pending = await asyncio.wait(waiters, timeout=CLOSE_TIMEOUT)
            for fut in pending:
                fut.cancel()
            for conn in conns:
                if conn in self._connections:
                    conn.abort()
            self._connections.difference_update(conns)
        if acceptor is not None:
            try:
                await asyncio.wait_for(acceptor.wait_closed(), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                logger.debug("SSH %s: listener did not report closed in time", self._label)
            logger.debug("SSH %s: closed (%d connection(s) dropped)", self._label, len(conns))

    async def __aenter__(self) -> NodeSSHServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
