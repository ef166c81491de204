"""Run Azurite, Azure's official storage emulator, as the emulated workspace's blob storage.

Azurite is the npm package ``azurite``. When it is not found (``AZURITE_BIN``, a
``node_modules`` next to the repository or the current folder, ``PATH``), the
first use installs the pinned version with ``npm`` into a cache folder
(``$AML_EMULATOR_CACHE``, else ``$XDG_CACHE_HOME/aml-emulator``, else
``~/.cache/aml-emulator``) and reuses it afterwards. Without ``npm`` the error
says how to install it by hand.
:class:`Azurite` starts ``azurite-blob`` on a loopback address with an
ephemeral port and a temporary workspace, and stops it (by process group) on
:meth:`~Azurite.stop`, on exit of a ``with`` block, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .config import cache_dir
from .datastores import DatastoreSpec

#: Azurite's well-known development account (public, documented by Microsoft).
DEV_ACCOUNT = "devstoreaccount1"
DEV_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
#: The Azurite release installed on first use (npm package ``azurite``).
AZURITE_VERSION = "3.35.0"
#: Bound on the one-time npm install.
INSTALL_TIMEOUT = 600.0
#: How to install Azurite, quoted in errors.
INSTALL_HINT = (
    "Azurite (the Azure Storage emulator, npm package 'azurite') is required. With Node.js "
    ">= 18 and npm on PATH it is installed automatically on first use; otherwise install it "
    f"with `npm install -g azurite@{AZURITE_VERSION}`, or set AZURITE_BIN to the path of its "
    "'azurite-blob' executable."
)
_LISTEN_RE = re.compile(r"listens on (https?://[^\s]+)")


class AzuriteNotFoundError(FileNotFoundError):
    """The ``azurite-blob`` executable could not be found."""


def install_azurite(prefix: Path | None = None, timeout: float = INSTALL_TIMEOUT) -> str:
    """Install Azurite :data:`AZURITE_VERSION` with npm (once); return its ``azurite-blob`` path.

    It is installed into ``prefix``. Concurrent callers (test processes) wait on a
    file lock; an install that was interrupted is redone (a marker file is written
    only after success).

    Parameters
    ----------
    prefix
        npm ``--prefix``; default ``cache_dir() / "azurite-<version>"``.
    timeout
        Bound on the npm run, in seconds.

    Raises
    ------
    AzuriteNotFoundError
        npm is missing, or the install failed or timed out (with npm's output).
    """
    prefix = prefix or cache_dir() / f"azurite-{AZURITE_VERSION}"
    exe = prefix / "node_modules" / ".bin" / "azurite-blob"
    marker = prefix / ".installed"
    npm = shutil.which("npm")
    if npm is None and not marker.exists():
        raise AzuriteNotFoundError(
            f"'azurite-blob' was not found and npm is not on PATH.\n{INSTALL_HINT}"
        )
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / f"{prefix.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if marker.exists() and os.access(exe, os.X_OK):
            return str(exe)
        print(
            f"Installing Azurite {AZURITE_VERSION} (Azure Storage emulator) with npm into "
            f"{prefix} (first use only)...",
            file=sys.stderr,
            flush=True,
        )
        cmd = [
            str(npm),
            "install",
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
            str(prefix),
            f"azurite@{AZURITE_VERSION}",
        ]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise AzuriteNotFoundError(
                f"`{' '.join(cmd)}` did not finish within {timeout:g}s.\n{INSTALL_HINT}"
            ) from None
        if done.returncode != 0 or not os.access(exe, os.X_OK):
            raise AzuriteNotFoundError(
                f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr)[-2000:]}\n{INSTALL_HINT}"
            )
        marker.write_text(AZURITE_VERSION + "\n")
    return str(exe)


def find_azurite(extra_dirs: list[str] | None = None, install: bool = True) -> str:
    """Return the path of the ``azurite-blob`` executable, installing it on first use.

    Looks at ``AZURITE_BIN``, then ``.ci-node/node_modules/.bin`` and
    ``node_modules/.bin`` under the repository (the parent of the installed
    package), under the current directory and under ``extra_dirs``, then ``PATH``,
    then the cache folder; if it is in none of them and ``install`` is true,
    :func:`install_azurite` puts it in the cache folder.

    Parameters
    ----------
    extra_dirs
        More directories holding a ``node_modules`` tree.
    install
        Install Azurite with npm when it is not found.

    Returns
    -------
    str
        Absolute path of the executable.

    Raises
    ------
    AzuriteNotFoundError
        With installation instructions.
    """
    env = os.environ.get("AZURITE_BIN")
    if env:
        if os.access(env, os.X_OK):
            return os.path.abspath(env)
        raise AzuriteNotFoundError(
            f"AZURITE_BIN={env!r} is not an executable file.\n{INSTALL_HINT}"
        )
    roots = [Path(__file__).resolve().parents[2], Path.cwd(), *map(Path, extra_dirs or [])]
    for root in roots:
        for sub in (".ci-node/node_modules/.bin", "node_modules/.bin"):
            candidate = root / sub / "azurite-blob"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("azurite-blob")
    if found:
        return found
    if install:
        return install_azurite()
    raise AzuriteNotFoundError(f"'azurite-blob' was not found.\n{INSTALL_HINT}")


class Azurite:
    """A local Azurite blob service (real Azure Blob REST API on loopback).

    Parameters
    ----------
    host
        Loopback listen address.
    port
        Listen port (0 = ephemeral).
    location
        Workspace directory; a temporary one (removed on stop) by default.
    executable
        ``azurite-blob`` path (default: :func:`find_azurite`).
    start_timeout
        Seconds to wait for the service to listen.

    Attributes
    ----------
    account_name, account_key
        The well-known development account and key.
    blob_endpoint
        ``http://127.0.0.1:<port>/devstoreaccount1`` once started.

    Examples
    --------
    >>> from aml_emulator import Azurite, Emulator
    >>> with Azurite() as azurite:  # doctest: +SKIP
    ...     store = azurite.datastore("lake", container="data")
    ...     with Emulator(datastores=[store]) as emu:
    ...         ml_client = emu.ml_client()
    """

    account_name = DEV_ACCOUNT
    account_key = DEV_ACCOUNT_KEY

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        location: str | None = None,
        executable: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if not host.startswith("127."):
            raise ValueError("Azurite is only started on loopback addresses (127.0.0.0/8)")
        self.host = host
        self.port = port
        self.location = location
        self.executable = executable
        self.start_timeout = start_timeout
        self.blob_endpoint = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._tempdir: str | None = None
        self._log_path: str | None = None

    def __repr__(self) -> str:
        state = self.blob_endpoint if self.running else "stopped"
        return f"<Azurite {state} account={self.account_name!r} key=***>"

    # ---------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        """Whether the Azurite process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Azurite:
        """Start ``azurite-blob`` and wait (bounded) until it listens.

        Returns
        -------
        Azurite
            ``self``.

        Raises
        ------
        AzuriteNotFoundError
            If the executable is missing.
        TimeoutError, RuntimeError
            If it does not listen within ``start_timeout`` or exits early (with its output).
        """
        if self.running:
            return self
        exe = self.executable or find_azurite()
        self._tempdir = tempfile.mkdtemp(prefix="azurite-")
        location = self.location or os.path.join(self._tempdir, "data")
        os.makedirs(location, exist_ok=True)
        self._log_path = os.path.join(self._tempdir, "azurite.out")
        cmd = [
            exe,
            "--blobHost",
            self.host,
            "--blobPort",
            str(self.port),
            "--location",
            location,
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ]
        with open(self._log_path, "wb") as out:
            # Own process group: stop() signals Azurite (node) and nothing else.
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        atexit.register(self.stop)
        try:
            self.blob_endpoint = self._wait_listening() + "/" + self.account_name
        except BaseException:
            self.stop()
            raise
        return self

    def _output(self) -> str:
        if not self._log_path or not os.path.exists(self._log_path):
            return ""
        with open(self._log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def _wait_listening(self) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            match = _LISTEN_RE.search(self._output())
            if match:
                return match.group(1).rstrip("/")
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"azurite-blob exited with code {self.proc.returncode} "
                    f"before listening:\n{self._output()[-2000:]}"
                )
            time.sleep(0.05)
        raise TimeoutError(
            f"azurite-blob did not listen within {self.start_timeout:g}s:\n{self._output()[-2000:]}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Azurite (SIGTERM to its process group, SIGKILL after ``timeout``) and clean up.

        Safe to call more than once.

        Parameters
        ----------
        timeout
            Seconds to wait after SIGTERM.
        """
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # Leftover children of the group (none expected) go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._tempdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None
        self.blob_endpoint = ""

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    @property
    def connection_string(self) -> str:
        """Account-key connection string of the running service (a secret: don't log it)."""
        if not self.blob_endpoint:
            raise RuntimeError("Azurite is not running; call start() first")
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.blob_endpoint};"
        )

    def blob_service_client(self) -> Any:
        """Return an ``azure.storage.blob.BlobServiceClient`` for the account.

        Returns
        -------
        azure.storage.blob.BlobServiceClient
            Authenticated with the account key.
        """
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def create_container(self, name: str) -> None:
        """Create a container if it does not exist.

        Parameters
        ----------
        name
            Container name.
        """
        from azure.core.exceptions import ResourceExistsError

        with self.blob_service_client() as service, contextlib.suppress(ResourceExistsError):
            service.create_container(name)

    def container_sas(self, container: str, hours: float = 24.0) -> str:
        """Return a container SAS token (read, add, create, write, delete, list).

        Parameters
        ----------
        container
            Container name.
        hours
            Validity.

        Returns
        -------
        str
            The token, without a leading ``?`` (a secret: don't log it).
        """
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        return generate_container_sas(
            self.account_name,
            container,
            account_key=self.account_key,
            permission=ContainerSasPermissions(
                read=True, add=True, create=True, write=True, delete=True, list=True
            ),
            expiry=datetime.now(timezone.utc) + timedelta(hours=hours),
        )

    def datastore(
        self,
        name: str,
        container: str,
        credential: str = "account_key",
        create: bool = True,
        **kwargs: Any,
    ) -> DatastoreSpec:
        """Return a :class:`DatastoreSpec` pointing at a container of this Azurite.

        Parameters
        ----------
        name
            Datastore name.
        container
            Container (created unless ``create=False``).
        credential
            ``"account_key"``, ``"sas"`` (a container SAS valid for 24 h) or ``"none"``.
        create
            Create the container.
        **kwargs
            More :class:`DatastoreSpec` fields (``kind``, ``is_default``, ``description``).

        Returns
        -------
        DatastoreSpec
            For ``Emulator(datastores=[...])``.
        """
        if create:
            self.create_container(container)
        return DatastoreSpec(
            name=name,
            account=self.account_name,
            container=container,
            credential=credential,
            endpoint=self.blob_endpoint,
            account_key=self.account_key if credential == "account_key" else None,
            sas_token=self.container_sas(container) if credential == "sas" else None,
            **kwargs,
        )
