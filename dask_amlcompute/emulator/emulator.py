"""The :class:`Emulator`: a local Azure ML workspace served from a background thread."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from . import identity
from .config import ComputeSpec, EmulatorConfig, EnvironmentSpec, load_config
from .controls import EmulatorControls
from .datastores import DatastoreSpec
from .engine import Endpoints, Engine
from .handlers import FaultState, ServerContext
from .mlflow_api import tracking_uri as make_tracking_uri
from .state import NodeRecord

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Upper bound for any call into the emulator's loop from another thread.
CALL_TIMEOUT = 60.0


class Emulator(EmulatorControls):
    """A local emulator of the Azure ML workspace API used by dask-amlcompute.

    It serves real HTTP(S) on a loopback address and runs jobs as local
    process groups.  It is an offline stand-in for tests and demos, not a
    production engine.

    Parameters
    ----------
    computes
        Compute targets (default: one 4-node ``cpu-cluster``).
    provisioning_delay
        Seconds each job spends in ``Preparing``.
    https
        Serve HTTPS with a generated self-signed certificate.
    workdir
        Parent directory of the emulator's temporary directory.
    host
        Loopback listen address.
    port
        Listen port (0 = ephemeral).
    environments
        Environments registered at start.
    datastores
        Datastores of the workspace (see :class:`~dask_amlcompute.emulator.Azurite`).
    build_environments
        Build environments with a conda file into cached virtualenvs the nodes
        run in (default); False runs every node on the emulator's own
        interpreter (fast, for tests that only check job shapes).
    environment_cache
        Folder of the cached builds (default ``$DASK_AMLCOMPUTE_EMULATOR_ENVS``,
        else ``~/.cache/dask-amlcompute/emulator-envs``).
    build_timeout
        Bound on one environment build, in seconds.
    config
        A full configuration; overrides the other arguments.

    Examples
    --------
    >>> from dask_amlcompute.emulator import Emulator, ComputeSpec
    >>> with Emulator(computes=[ComputeSpec("cpu-cluster", max_nodes=2)]) as emu:  # doctest: +SKIP
    ...     ml = emu.ml_client()
    ...     ml.compute.get("cpu-cluster").max_instances
    2
    """

    subscription_id = identity.SUBSCRIPTION_ID
    resource_group = identity.RESOURCE_GROUP
    workspace_name = identity.WORKSPACE_NAME
    region = identity.REGION

    def __init__(
        self,
        computes: Iterable[ComputeSpec] | None = None,
        *,
        provisioning_delay: float = 0.0,
        https: bool = False,
        workdir: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        environments: Iterable[EnvironmentSpec] | None = None,
        datastores: Iterable[DatastoreSpec] | None = None,
        build_environments: bool = True,
        environment_cache: str | None = None,
        build_timeout: float = 900.0,
        config: EmulatorConfig | None = None,
    ) -> None:
        if config is None:
            kwargs: dict[str, Any] = {}
            if computes is not None:
                kwargs["computes"] = list(computes)
            config = EmulatorConfig(
                provisioning_delay=provisioning_delay,
                https=https,
                workdir=workdir,
                host=host,
                port=port,
                environments=list(environments or []),
                datastores=list(datastores or []),
                build_environments=build_environments,
                environment_cache=environment_cache,
                build_timeout=build_timeout,
                **kwargs,
            )
        self.config = config
        self.base_url = ""
        self.cert_path: str | None = None
        self.tracking_uri = ""
        self.tempdir: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._engine: Engine | None = None
        self._faults = FaultState()
        self._host_keys: dict[tuple[str, int], Any] = {}
        self._net_claim: Any = None
        self.node_net: int | None = None

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> Emulator:
        """Create an emulator from a YAML or JSON configuration file.

        Parameters
        ----------
        path
            See :func:`dask_amlcompute.emulator.config.load_config` for the format.
        **overrides
            :class:`EmulatorConfig` fields overriding the file (e.g. ``port``).

        Returns
        -------
        Emulator
            A stopped emulator.
        """
        config = load_config(path)
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        config.__post_init__()
        return cls(config=config)

    # ---------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        """Whether the emulator is serving."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> Emulator:
        """Start serving in a background thread.

        Parameters
        ----------
        timeout
            Seconds to wait for the server to listen.

        Returns
        -------
        Emulator
            ``self``.
        """
        if self.running:
            return self
        self.tempdir = tempfile.mkdtemp(prefix="aml-emulator-", dir=self.config.workdir)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(started,), name="aml-emulator", daemon=True
        )
        self._thread.start()
        started.wait(timeout)
        try:
            asyncio.run_coroutine_threadsafe(self._astart(), self._loop).result(timeout)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)
        return self

    def _run_loop(self, started: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    async def _astart(self) -> None:
        import tornado.httpserver
        import tornado.netutil

        from .netclaim import claim_loopback_net
        from .server import make_app
        from .tls import make_self_signed, server_ssl_context

        assert self.tempdir is not None
        self.node_net, self._net_claim = claim_loopback_net()
        ssl_ctx = None
        if self.config.https:
            self.cert_path, key_path = make_self_signed(self.tempdir, self.config.host)
            ssl_ctx = server_ssl_context(self.cert_path, key_path)
        sockets = tornado.netutil.bind_sockets(self.config.port, self.config.host)
        port = sockets[0].getsockname()[1]
        scheme = "https" if ssl_ctx else "http"
        self.base_url = f"{scheme}://{self.config.host}:{port}"
        self.tracking_uri = make_tracking_uri(self.base_url)
        self._engine = Engine(
            self.config,
            self.tempdir,
            Endpoints(self.tracking_uri, self.cert_path),
            self._start_ssh,
            net=self.node_net,
        )
        if self.config.build_environments:
            from .envbuild import EnvironmentBuilder

            self._engine.configure_builds(
                EnvironmentBuilder(self.config.environment_cache, self.config.build_timeout)
            )
        ctx = ServerContext(
            engine=self._engine,
            base_url=self.base_url,
            tracking_uri=self.tracking_uri,
            faults=self._faults,
            datastores={d.name.lower(): d for d in self.config.datastores},
        )
        self._server = tornado.httpserver.HTTPServer(
            make_app(ctx), ssl_options=ssl_ctx, xheaders=False
        )
        self._server.add_sockets(sockets)

    async def _start_ssh(self, spec: ComputeSpec, node: NodeRecord) -> Any:
        from .ssh import NodeSSHServer, generate_host_key

        # A node keeps its host key across jobs, as a real node keeps its own.
        key_id = (spec.name, node.slot)
        if key_id not in self._host_keys:
            self._host_keys[key_id] = generate_host_key()
        assert spec.admin_user  # the engine starts SSH only when spec.ssh_enabled
        assert self._engine is not None  # the engine calls this
        server = NodeSSHServer(
            host="127.0.0.1",
            port=0,
            admin_user=spec.admin_user,
            authorized_keys=list(spec.ssh_public_keys),
            allowed_forward_hosts={node.ip},
            host_key=self._host_keys[key_id],
            network=self._engine.network,
            compute=spec.name,
        )
        await server.start()
        return server

    async def _astop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._engine is not None:
            await self._engine.shutdown()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.close_all_connections(), 5.0)
        self._server = None
        if self._net_claim is not None:
            self._net_claim.close()
            self._net_claim = None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving, kill every node process group, remove the temp directory.

        Safe to call more than once.

        Parameters
        ----------
        timeout
            Upper bound for the shutdown.
        """
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout)
            except Exception:
                logger.exception("error while stopping the emulator")
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        if loop is not None and not loop.is_running():
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        self._loop = self._thread = None
        self._engine = None
        if self._net_claim is not None:
            self._net_claim.close()
            self._net_claim = None
        if self.tempdir:
            shutil.rmtree(self.tempdir, ignore_errors=True)
            self.tempdir = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def _call(self, fn: Callable[[Engine], T]) -> T:
        """Run ``fn(engine)`` on the emulator loop and return its result."""
        if self._loop is None or self._engine is None:
            raise RuntimeError("the emulator is not running; call start() first")
        engine = self._engine
        if threading.current_thread() is self._thread:
            return fn(engine)

        async def _run() -> T:
            return fn(engine)

        return asyncio.run_coroutine_threadsafe(_run(), self._loop).result(CALL_TIMEOUT)

    def ml_client(self, **kwargs: Any) -> Any:
        """Return a real ``azure.ai.ml.MLClient`` pointed at this emulator.

        Parameters
        ----------
        **kwargs
            Extra ``MLClient`` keyword arguments.

        Returns
        -------
        azure.ai.ml.MLClient
            Unmodified SDK client with an emulator credential and transport.
        """
        from .client import make_ml_client

        if not self.base_url:
            raise RuntimeError("the emulator is not running; call start() first")
        return make_ml_client(self.base_url, cert_path=self.cert_path, **kwargs)

    def credential(self) -> Any:
        """Return a credential accepted by the emulator (no Azure login).

        Returns
        -------
        EmulatorCredential
            Token credential returning unsigned JWTs.
        """
        from .client import EmulatorCredential

        return EmulatorCredential()

    @property
    def provisioning_delay(self) -> float:
        """Seconds each job spends in ``Preparing`` (settable while running)."""
        if self._engine is None:
            return float(self.config.provisioning_delay)
        return self._engine.provisioning_delay

    @provisioning_delay.setter
    def provisioning_delay(self, value: float) -> None:
        self.config.provisioning_delay = float(value)
        if self._engine is not None:
            engine = self._engine
            self._call(lambda e: setattr(engine, "provisioning_delay", float(value)))
