"""The ``isolated`` node network: one Linux network namespace per compute.

On AML, a client outside the compute's VNet (a laptop, a compute instance of
another network) cannot reach the nodes' private IPs; only the nodes' public
SSH endpoints are reachable, while the nodes of one compute reach each other
and the workspace's services.  :class:`IsolatedNetwork` reproduces that on
one machine:

* each compute's nodes run in a network namespace of their own, created on
  first use (:meth:`IsolatedNetwork.open`), with only its loopback device, which
  is brought up; the node addresses ``127.{net}.{compute + 1}.{slot + 1}`` live
  on that loopback, so from the emulator's (the client's) namespace nothing
  answers on them;
* node processes enter it with ``nsenter --net=<handle> --`` (util-linux),
  which execs the node's shell: the shell keeps the PID, so the process
  group the emulator signals is still the one ``start_new_session`` made;
* sockets the emulator needs in the namespace (SSH forwards, bridges) are
  created by a short-lived thread that first joins it with ``setns(2)``; a
  socket stays in the namespace it was created in for its whole life, and the
  thread ends right after, so no thread of the emulator stays in a namespace;
* the only ways out are bridges: for each endpoint the emulator hands to
  nodes (its base URL, hence the MLflow tracking URI and the code blob service,
  and each datastore's blob endpoint, e.g. Azurite) a listener on the same
  ``host:port`` inside the namespace relays each connection to that address in
  the emulator's namespace;
* the way in is the nodes' SSH endpoints: they listen in the emulator's
  namespace and dial their forwards inside the compute's.

Lifetime: a namespace is held by a *holder* process, ``unshare --net -- sh -c
'echo ready; exec cat'``, whose standard input is a pipe only the emulator
holds.  It exits when that pipe closes: on :meth:`IsolatedNetwork.close`, or
when the emulator process dies for any reason (the kernel closes the pipe).
The emulator also keeps a file descriptor on the namespace (opened from
``/proc/<holder>/ns/net`` once the holder said it runs in the new namespace,
checked to differ from the emulator's own) and passes it to ``nsenter`` as
``/proc/<emulator pid>/fd/<fd>``, so a holder that died early can never
send nodes into a namespace of a recycled PID.  A namespace disappears once
its holder, its node processes and its sockets are gone; nothing is named in
``/run/netns``, so nothing is left behind.

Requirements: Linux, root or ``CAP_SYS_ADMIN``, and ``unshare`` / ``nsenter``
from util-linux.  :meth:`IsolatedNetwork.check` tries it all once and raises
:class:`NetworkNamespaceError` naming what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .network import listen_on, open_connection_socket, tcp_socket

__all__ = ["IsolatedNetwork", "NetworkNamespaceError"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: ``setns(2)`` namespace type of a network namespace.
CLONE_NEWNET = 0x40000000
#: ``ioctl`` requests reading / setting an interface's flags, and the "up" flag.
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
#: Seconds allowed for a holder process to report that it runs in its namespace.
HOLDER_START_TIMEOUT = 10.0
#: Seconds allowed for a call made inside a namespace (creating a socket).
NS_CALL_TIMEOUT = 5.0
#: Seconds a bridge allows for connecting to the emulator-side endpoint.
BRIDGE_CONNECT_TIMEOUT = 10.0
#: Seconds allowed for each step of tearing a namespace down.
CLOSE_TIMEOUT = 5.0
#: Bytes a bridge moves per read.
RELAY_CHUNK = 65536
#: The holder: say so once inside the new namespace, then block until stdin closes.
HOLDER_SCRIPT = "echo ready && exec cat >/dev/null"


class NetworkNamespaceError(RuntimeError):
    """The ``isolated`` network mode cannot run on this machine (the message says why)."""


@functools.lru_cache(maxsize=1)
def _setns() -> Callable[[int, int], int]:
    """Return libc's ``setns(fd, nstype)`` (Python 3.11 has no ``os.setns``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def find_tools() -> tuple[str, str]:
    """Return the paths of ``unshare`` and ``nsenter``, or say why namespaces are unavailable.

    Returns
    -------
    tuple of str
        ``(unshare, nsenter)``.

    Raises
    ------
    NetworkNamespaceError
        Not Linux, no ``setns`` in libc, or a tool not on ``PATH``.
    """
    why = "the emulator's isolated network mode needs Linux network namespaces"
    if not sys.platform.startswith("linux"):
        raise NetworkNamespaceError(f"{why}; this is {sys.platform}")
    try:
        _setns()
    except (OSError, AttributeError) as exc:
        raise NetworkNamespaceError(f"{why}; libc has no setns(): {exc}") from None
    found = {name: shutil.which(name) for name in ("unshare", "nsenter")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise NetworkNamespaceError(
            f"{why}; {' and '.join(missing)} (util-linux) not found on PATH"
        )
    return found["unshare"] or "", found["nsenter"] or ""


def _privilege_hint() -> str:
    if os.geteuid() == 0:
        return "running as root; a container may still lack CAP_SYS_ADMIN"
    return f"running as uid {os.geteuid()}: run as root or with CAP_SYS_ADMIN"


def _stop_holder(proc: subprocess.Popen[bytes]) -> None:
    """Close the holder's stdin (it exits on EOF); SIGKILL its PID if it does not, bounded."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(CLOSE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()  # the PID this emulator started, nothing else
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(CLOSE_TIMEOUT)
    for pipe in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            if pipe is not None:
                pipe.close()


def _start_holder(unshare: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a holder in a new network namespace; return it and a descriptor on the namespace."""
    proc = subprocess.Popen(
        [unshare, "--net", "--", "/bin/sh", "-c", HOLDER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C meant for the emulator is not the holder's business
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], HOLDER_START_TIMEOUT)
        line = os.read(proc.stdout.fileno(), 64) if ready else b""  # readable: never blocks
        if line.strip() != b"ready":
            raise _holder_failure(proc, answered=bool(ready))
        fd = os.open(f"/proc/{proc.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        ns, own = os.fstat(fd), os.stat("/proc/self/ns/net")
        if (ns.st_dev, ns.st_ino) == (own.st_dev, own.st_ino):
            os.close(fd)
            raise NetworkNamespaceError("unshare --net left the holder in the emulator's namespace")
    except BaseException:
        _stop_holder(proc)
        raise
    return proc, fd


def _holder_failure(proc: subprocess.Popen[bytes], answered: bool) -> NetworkNamespaceError:
    """The error for a holder that did not report ready, with what ``unshare`` said."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    stderr = b""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        proc.wait(CLOSE_TIMEOUT if answered else 0.5)
        if proc.stderr is not None:
            stderr = proc.stderr.read()
    detail = stderr.decode("utf-8", "replace").strip() or (
        f"exit status {proc.returncode}"
        if proc.returncode is not None
        else f"no answer within {HOLDER_START_TIMEOUT:.0f}s"
    )
    return NetworkNamespaceError(
        "the emulator's isolated network mode could not create a network namespace "
        f"(unshare --net): {detail} ({_privilege_hint()})"
    )


def _loopback_up() -> None:
    """Bring ``lo`` up in the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


async def _call_in_namespace(ns_fd: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that first joins the network namespace ``ns_fd``.

    The thread ends right after, so its namespace never leaks into a thread
    the emulator reuses.  A socket ``fn`` returns stays in that namespace.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller gave up: do not leak what came too late
            if isinstance(result, socket.socket):
                result.close()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            if _setns()(ns_fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns(CLONE_NEWNET): {os.strerror(errno)}")
            result = fn()
        except BaseException as exc:  # handed to the caller
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=run, name="aml-emulator-netns", daemon=True).start()
    return await asyncio.wait_for(future, NS_CALL_TIMEOUT)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF (then half-close), or drop both on an error."""
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except OSError:  # reset or broken pipe: the other direction ends too
        writer.close()


@dataclass
class _Namespace:
    """One compute's namespace: its holder, a descriptor on it, its bridges."""

    compute: str
    holder: subprocess.Popen[bytes]
    fd: int
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    relays: set[asyncio.Task[Any]] = field(default_factory=set)


class IsolatedNetwork:
    """Each compute's nodes in a network namespace of their own (see the module notes).

    Parameters
    ----------
    bridges
        ``(host, port)`` endpoints of the emulator that nodes may reach: each
        gets a listener on the same address inside every namespace, relaying
        to that address in the emulator's namespace.  Nothing else leaves a
        namespace.

    Examples
    --------
    >>> net = IsolatedNetwork(bridges=[("127.0.0.1", 8765)])  # doctest: +SKIP
    >>> await net.check()                                       # doctest: +SKIP
    >>> await net.open("cpu-cluster")                           # doctest: +SKIP
    >>> net.command_prefix("cpu-cluster")                       # doctest: +SKIP
    ['/usr/bin/nsenter', '--net=/proc/4242/fd/17', '--']
    """

    mode = "isolated"

    def __init__(self, bridges: Iterable[tuple[str, int]] = ()) -> None:
        self.bridges = sorted({(str(host), int(port)) for host, port in bridges})
        self._tools: tuple[str, str] | None = None
        self._namespaces: dict[str, _Namespace] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    @property
    def holder_pids(self) -> dict[str, int]:
        """PID of the holder process of each open compute network, by compute name."""
        return {ns.compute: ns.holder.pid for ns in self._namespaces.values()}

    async def check(self) -> None:
        """Create and remove a throw-away namespace, so an unusable machine fails early.

        Raises
        ------
        NetworkNamespaceError
            Naming why: not Linux, tools missing, not permitted (not root /
            no ``CAP_SYS_ADMIN``), or ``setns`` refused.
        """
        self._tools = find_tools()
        ns = await self._create("(check)", bridges=False)
        await self._destroy(ns)

    async def open(self, compute: str) -> None:
        """Create the compute's namespace with its bridges, once (concurrent calls share it).

        Parameters
        ----------
        compute
            Compute name (case-insensitive).

        Raises
        ------
        NetworkNamespaceError
            The namespace cannot be created.
        RuntimeError
            The network was closed.
        """
        key = compute.lower()
        if key in self._namespaces:
            return
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key in self._namespaces:
                return
            if self._closed:
                raise RuntimeError("the emulator's isolated network is closed")
            ns = await self._create(compute, bridges=True)
            if self._closed:  # closed while creating
                await self._destroy(ns)
                raise RuntimeError("the emulator's isolated network is closed")
            self._namespaces[key] = ns
            logger.debug("network namespace of %s: holder pid %d", compute, ns.holder.pid)

    def command_prefix(self, compute: str) -> list[str]:
        """``nsenter --net=/proc/<emulator pid>/fd/<fd> --``: run in the compute's namespace.

        ``nsenter`` execs the command, so the node's shell keeps the PID (and
        process group) the emulator started.

        Parameters
        ----------
        compute
            Compute name; :meth:`open` must have returned for it.

        Returns
        -------
        list of str
            The argv prefix.
        """
        ns = self._namespaces.get(compute.lower())
        if ns is None or self._tools is None:
            raise RuntimeError(f"the network of compute {compute!r} is not open")
        return [self._tools[1], f"--net=/proc/{os.getpid()}/fd/{ns.fd}", "--"]

    async def listen(self, compute: str | None, host: str, port: int) -> socket.socket:
        """A listening socket on ``host:port`` in the compute's namespace (None: the emulator's).

        Parameters
        ----------
        compute
            Compute name (opened if needed), or None for the public side.
        host, port
            Address to bind.

        Returns
        -------
        socket.socket
            Non-blocking, listening.
        """
        if compute is None:
            return listen_on(tcp_socket(), host, port)
        ns = await self._namespace(compute)
        return listen_on(await _call_in_namespace(ns.fd, tcp_socket), host, port)

    async def connect(
        self, compute: str | None, host: str, port: int, timeout: float
    ) -> socket.socket:
        """A socket connected to ``host:port`` from inside the compute's namespace.

        Parameters
        ----------
        compute
            Compute name (opened if needed), or None for the public side.
        host, port
            Address to connect to.
        timeout
            Seconds allowed for connecting.

        Returns
        -------
        socket.socket
            Non-blocking, connected.

        Raises
        ------
        OSError
            Refused, unreachable, or ``TimeoutError``.
        """
        if compute is None:
            sock = tcp_socket()
        else:
            ns = await self._namespace(compute)
            sock = await _call_in_namespace(ns.fd, tcp_socket)
        return await open_connection_socket(sock, host, port, timeout)

    async def release(self, compute: str) -> None:
        """Close one compute's bridges and stop its holder, if open (idempotent).

        Parameters
        ----------
        compute
            Compute name (case-insensitive): a deleted compute, or the pool of a
            finished serverless job.
        """
        key = compute.lower()
        async with self._locks.setdefault(key, asyncio.Lock()):
            ns = self._namespaces.pop(key, None)
            if ns is not None:
                await self._destroy(ns)
        self._locks.pop(key, None)

    async def close(self) -> None:
        """Close every bridge and stop every holder (idempotent; each step bounded)."""
        self._closed = True
        namespaces = list(self._namespaces.values())
        self._namespaces.clear()
        for ns in namespaces:
            await self._destroy(ns)

    def close_now(self) -> None:
        """Without the event loop: stop every holder and drop the namespace handles.

        A last resort for an emulator whose loop is gone; bridges and sockets
        die with the loop's sockets.
        """
        self._closed = True
        namespaces = list(self._namespaces.values())
        self._namespaces.clear()
        for ns in namespaces:
            with contextlib.suppress(OSError):
                os.close(ns.fd)
            _stop_holder(ns.holder)

    # ------------------------------------------------------------------ internals
    async def _namespace(self, compute: str) -> _Namespace:
        await self.open(compute)
        return self._namespaces[compute.lower()]

    async def _create(self, compute: str, *, bridges: bool) -> _Namespace:
        if self._tools is None:
            self._tools = find_tools()
        holder, fd = await asyncio.to_thread(_start_holder, self._tools[0])
        ns = _Namespace(compute=compute, holder=holder, fd=fd)
        try:
            try:
                await _call_in_namespace(fd, _loopback_up)
            except OSError as exc:
                raise NetworkNamespaceError(
                    "the emulator's isolated network mode could not enter its network "
                    f"namespace or bring up its loopback: {exc} ({_privilege_hint()})"
                ) from exc
            for host, port in self.bridges if bridges else []:
                ns.servers.append(await self._bridge(ns, host, port))
        except BaseException:
            await self._destroy(ns)
            raise
        return ns

    async def _bridge(self, ns: _Namespace, host: str, port: int) -> asyncio.AbstractServer:
        """Listen on ``host:port`` inside ``ns``; relay each connection to it outside."""
        sock = listen_on(await _call_in_namespace(ns.fd, tcp_socket), host, port)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                ns.relays.add(task)
            try:
                try:  # dialled by the loop's thread: the emulator's own namespace
                    up_reader, up_writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port), BRIDGE_CONNECT_TIMEOUT
                    )
                except (OSError, asyncio.TimeoutError) as exc:
                    logger.debug("bridge %s:%s of %s: %s", host, port, ns.compute, exc)
                    return
                try:
                    await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
                finally:
                    await _close_writer(up_writer)
            finally:
                await _close_writer(writer)
                if task is not None:
                    ns.relays.discard(task)

        try:
            return await asyncio.start_server(relay, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _destroy(self, ns: _Namespace) -> None:
        for server in ns.servers:
            server.close()
        for task in list(ns.relays):
            task.cancel()
        if ns.relays:
            await asyncio.wait(list(ns.relays), timeout=CLOSE_TIMEOUT)
        for server in ns.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)
        ns.servers.clear()
        with contextlib.suppress(OSError):
            os.close(ns.fd)
        await asyncio.to_thread(_stop_holder, ns.holder)
