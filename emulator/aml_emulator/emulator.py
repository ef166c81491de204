"""The :class:`Emulator`: a local Azure ML workspace served from a background thread."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
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
from .mlflow_api import azureml_tracking_uri
from .mlflow_api import tracking_uri as make_tracking_uri
from .network import LoopbackNetwork, NodeNetwork
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
        Datastores of the workspace (see :class:`~aml_emulator.Azurite`).
    build_environments
        Build environments with a conda file into cached virtualenvs the nodes
        run in (default); False runs every node on the emulator's own
        interpreter (fast, for tests that only check job shapes).
    environment_cache
        Folder of the cached builds (default ``$AML_EMULATOR_ENVS``,
        else ``~/.cache/aml-emulator/envs``).
    build_timeout
        Bound on one environment build, in seconds.
    network
        ``"loopback"`` (default) or ``"isolated"``: each compute's nodes in a
        network namespace of their own, reachable only through their SSH
        endpoints (see :class:`~aml_emulator.config.EmulatorConfig`).
    config
        A full configuration; overrides the other arguments.

    Examples
    --------
    >>> from aml_emulator import Emulator, ComputeSpec
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
        network: str = "loopback",
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
                network=network,
                **kwargs,
            )
        self.config = config
        self.base_url = ""
        self.cert_path: str | None = None
        self.tracking_uri = ""
        #: What the jobs' nodes get as ``MLFLOW_TRACKING_URI`` (``azureml://``, TLS, token).
        self.node_tracking_uri = ""
        self._tracking_port: int | None = None
        self._tracking_server: Any = None
        self.tempdir: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._engine: Engine | None = None
        self._faults = FaultState()
        self._ctx: ServerContext | None = None
        #: (compute, slot) -> (node id of the VM holding it, its host key)
        self._host_keys: dict[tuple[str, int], tuple[str, Any]] = {}
        #: (compute, slot) -> the public port the slot's SSH endpoint got first
        self._ssh_ports: dict[tuple[str, int], int] = {}
        self._net_claim: Any = None
        self.node_net: int | None = None
        self._network: NodeNetwork | None = None

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> Emulator:
        """Create an emulator from a YAML or JSON configuration file.

        Parameters
        ----------
        path
            See :func:`aml_emulator.config.load_config` for the format.
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

        from .mlflow_api import make_tracking_app
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
        # The nodes' tracking endpoint: TLS and a bearer token, like AML's azureml:// service
        tracking_sockets = tornado.netutil.bind_sockets(0, self.config.host)
        self._tracking_port = tracking_sockets[0].getsockname()[1]
        try:
            self._network = await self._open_network(port)
        except BaseException:
            for sock in sockets + tracking_sockets:
                sock.close()
            raise
        scheme = "https" if ssl_ctx else "http"
        self.base_url = f"{scheme}://{self.config.host}:{port}"
        self.tracking_uri = make_tracking_uri(self.base_url)
        tracking_dir = os.path.join(self.tempdir, "tracking-tls")
        os.makedirs(tracking_dir, exist_ok=True)
        tracking_cert, tracking_key = make_self_signed(tracking_dir, self.config.host)
        self.node_tracking_uri = azureml_tracking_uri(f"{self.config.host}:{self._tracking_port}")
        self._engine = Engine(
            self.config,
            self.tempdir,
            Endpoints(
                self.tracking_uri,
                self.cert_path,
                node_tracking_uri=self.node_tracking_uri,
                node_ca_cert=tracking_cert,
            ),
            self._start_ssh,
            net=self.node_net,
            network=self._network,
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
            request_latency=self.config.request_latency,
        )
        self._ctx = ctx
        self._server = tornado.httpserver.HTTPServer(
            make_app(ctx), ssl_options=ssl_ctx, xheaders=False
        )
        self._server.add_sockets(sockets)
        self._tracking_server = tornado.httpserver.HTTPServer(
            make_tracking_app(ctx), ssl_options=server_ssl_context(tracking_cert, tracking_key)
        )
        self._tracking_server.add_sockets(tracking_sockets)

    async def _open_network(self, port: int) -> NodeNetwork:
        """Return the nodes' network; an isolated one is checked first (errors name why)."""
        if self.config.network != "isolated":
            return LoopbackNetwork()
        from .netns import IsolatedNetwork

        network = IsolatedNetwork(bridges=self.node_endpoints(port))
        await network.check()
        return network

    def node_endpoints(self, port: int | None = None) -> list[tuple[str, int]]:
        """The emulator's endpoints that nodes are given, as ``(host, port)``.

        Its own address (base URL: MLflow tracking URI, code snapshots) and
        each datastore's blob endpoint URL.  In the ``isolated`` network mode
        these are bridged into every compute's namespace, and nothing else.

        Parameters
        ----------
        port
            The emulator's port (default: the one it serves on).

        Returns
        -------
        list of tuple
            ``(host, port)`` pairs.
        """
        from urllib.parse import urlsplit

        if port is None:
            port = urlsplit(self.base_url).port
        found = [(self.config.host, int(port))] if port else []
        if self._tracking_port:
            found.append((self.config.host, self._tracking_port))
        for store in self.config.datastores:
            url = urlsplit(store.endpoint) if "://" in store.endpoint else None
            if url is not None and url.hostname:
                found.append((url.hostname, url.port or (443 if url.scheme == "https" else 80)))
        return found

    @property
    def node_network(self) -> NodeNetwork | None:
        """The network the nodes are on while running (None when stopped)."""
        return self._network

    async def _start_ssh(self, spec: ComputeSpec, node: NodeRecord) -> Any:
        """Start a node's public SSH endpoint: a stable port per slot, a host key per VM.

        AML's public endpoint is a load balancer IP with a port per node; a new
        VM behind the same port has a new host key. So the slot's endpoint
        keeps the port it got first (a new one, logged, if that cannot be bound
        again), and the host key lasts as long as the VM holding the slot
        (``node.node_id``, new after a scale-down or a preemption).
        """
        from .ssh import NodeSSHServer, generate_host_key

        slot_id = (spec.name, node.slot)
        held = self._host_keys.get(slot_id)
        if held is None or held[0] != node.node_id:  # a new VM: a new host key
            held = self._host_keys[slot_id] = (node.node_id, generate_host_key())
        assert spec.admin_user  # the engine starts SSH only when spec.ssh_enabled
        assert self._engine is not None  # the engine calls this
        engine = self._engine

        def endpoint(port: int) -> NodeSSHServer:
            return NodeSSHServer(
                host="127.0.0.1",
                port=port,
                admin_user=spec.admin_user or "",
                authorized_keys=list(spec.ssh_public_keys),
                allowed_forward_hosts={node.ip},
                host_key=held[1],
                network=engine.network,
                compute=spec.name,
                public=True,  # the client's way in; forwards are dialled in the node's network
            )

        port = self._ssh_ports.get(slot_id, 0)
        server = endpoint(port)
        try:
            await server.start()
        except OSError as exc:
            if not port:
                raise
            logger.warning(
                "SSH endpoint of %s node slot %d: port %d is taken (%s); using a new port",
                spec.name,
                node.slot,
                port,
                exc,
            )
            server = endpoint(0)
            await server.start()
        self._ssh_ports[slot_id] = server.port
        return server

    async def _astop(self) -> None:
        if self._server is not None:
            self._server.stop()
        tracking, self._tracking_server = self._tracking_server, None
        if tracking is not None:
            tracking.stop()
        if self._engine is not None:
            await self._engine.shutdown()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.close_all_connections(), 5.0)
        self._server = None
        network, self._network = self._network, None
        if network is not None:  # after the nodes: holders and bridges last
            await asyncio.wait_for(network.close(), CALL_TIMEOUT)
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
            shutdown = loop.shutdown_asyncgens()
            try:
                loop.run_until_complete(shutdown)
            except Exception:  # e.g. this thread runs a loop of its own (a Jupyter kernel)
                shutdown.close()  # else "coroutine ... was never awaited" on stderr
            loop.close()
        self._loop = self._thread = None
        self._engine = None
        if self._network is not None:  # the loop could not close it
            from .netns import IsolatedNetwork

            if isinstance(self._network, IsolatedNetwork):
                self._network.close_now()
            self._network = None
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
