"""Base request handler shared by every emulator route: JSON I/O, ARM errors, faults."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import tornado.web

from . import identity
from .engine import Engine
from .errors import ApiError
from .shapes import arm_error

logger = logging.getLogger(__name__)


@dataclass
class FaultState:
    """Pending injected HTTP errors for control-plane requests."""

    remaining: int = 0
    status: int = 503
    retry_after: float | None = None

    def take(self) -> tuple[int, float | None] | None:
        """Consume one injected error.

        Returns
        -------
        tuple or None
            ``(status, retry_after)`` if an error is due, else None.
        """
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        return self.status, self.retry_after


#: Entries kept in the request log (oldest dropped first).
REQUEST_LOG_SIZE = 100_000


@dataclass
class ServerContext:
    """What handlers need: the engine, URLs, the fault state and the datastores.

    ``request_latency`` (seconds) delays every control-plane and run-history
    request before it is served, as a round trip to Azure would (100-300 ms
    from a laptop); ``request_log`` records those requests as
    ``{"method", "path", "status", "start", "end"}`` (``time.time()``).
    """

    engine: Engine
    base_url: str
    tracking_uri: str
    faults: FaultState
    datastores: dict[str, Any] = field(default_factory=dict)
    request_latency: float = 0.0
    request_log: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE)
    )


class BaseHandler(tornado.web.RequestHandler):
    """JSON handler answering ARM-style errors, never a traceback.

    Subclasses set ``control_plane = False`` to be exempt from injected faults
    (node-facing routes: mlflow, logs); control-plane and ``run_history``
    (MLflow tracking) routes get the request latency and are logged.
    """

    control_plane = True
    run_history = False
    ctx: ServerContext

    def initialize(self, ctx: ServerContext) -> None:
        """Receive the server context.

        Parameters
        ----------
        ctx
            Shared context.
        """
        self.ctx = ctx

    @property
    def engine(self) -> Engine:
        """Engine: the emulated workspace."""
        return self.ctx.engine

    def set_default_headers(self) -> None:
        """Send JSON and a request id by default."""
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("x-ms-request-id", "00000000-0000-0000-0000-emulator0000")

    @property
    def round_trip(self) -> bool:
        """Whether this is a control-plane or run-history request (latency, log)."""
        return self.control_plane or self.run_history

    async def prepare(self) -> None:
        """Apply the request latency, injected faults; check the workspace in the path."""
        if self.round_trip and self.ctx.request_latency > 0:
            await asyncio.sleep(self.ctx.request_latency)
        if self.control_plane:
            fault = self.ctx.faults.take()
            if fault is not None:
                status, retry_after = fault
                if retry_after is not None:
                    self.set_header("Retry-After", f"{retry_after:g}")
                self.send_arm_error(
                    status,
                    "InjectedFault" if status != 429 else "TooManyRequests",
                    f"injected HTTP {status} (emulator fault injection)",
                )
                return
        kw = self.path_kwargs
        if "sub" in kw:
            wanted = (identity.SUBSCRIPTION_ID, identity.RESOURCE_GROUP, identity.WORKSPACE_NAME)
            got = (
                kw["sub"],
                kw.get("rg") or identity.RESOURCE_GROUP,
                kw.get("ws") or identity.WORKSPACE_NAME,
            )
            if [g.lower() for g in got] != [w.lower() for w in wanted]:
                self.send_arm_error(
                    404,
                    "ResourceNotFound",
                    f"Workspace {got[0]}/{got[1]}/{got[2]} not found; the emulator serves "
                    f"subscription {wanted[0]}, resource group {wanted[1]}, workspace {wanted[2]}.",
                )

    def on_finish(self) -> None:
        """Log a control-plane or run-history request (see :class:`ServerContext`)."""
        if self.round_trip:
            end = time.time()
            self.ctx.request_log.append(
                {
                    "method": self.request.method,
                    "path": self.request.path,
                    "status": self.get_status(),
                    "start": end - self.request.request_time(),
                    "end": end,
                }
            )

    def send_arm_error(self, status: int, code: str, message: str) -> None:
        """Finish the request with an ARM error body.

        Parameters
        ----------
        status
            HTTP status.
        code
            ARM error code.
        message
            Message.
        """
        self.set_status(status)
        self.finish(json.dumps(arm_error(code, message)))

    def send_json(self, data: Any, status: int = 200) -> None:
        """Finish the request with a JSON body.

        Parameters
        ----------
        data
            JSON-serialisable body.
        status
            HTTP status.
        """
        self.set_status(status)
        self.finish(json.dumps(data))

    def json_body(self) -> Any:
        """Parse the request body.

        Returns
        -------
        Any
            The parsed JSON ({} for an empty body).

        Raises
        ------
        ApiError
            400 if the body is not valid JSON.
        """
        raw = self.request.body
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "BadRequest", f"malformed JSON body: {exc}") from None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render errors (including unexpected exceptions) as ARM error JSON.

        Parameters
        ----------
        status_code
            HTTP status.
        **kwargs
            ``exc_info`` from tornado.
        """
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            self.set_status(exc.status)
            body = arm_error(exc.code, exc.message)
        elif isinstance(exc, tornado.web.HTTPError):
            code = {404: "NotFound", 405: "MethodNotAllowed"}.get(
                status_code, "BadRequest" if status_code < 500 else "InternalServerError"
            )
            body = arm_error(code, exc.log_message or self._reason)
        else:
            body = arm_error("InternalServerError", f"emulator error: {exc!r}")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Log unexpected exceptions only (ApiError is an answer, not a bug)."""
        if isinstance(value, ApiError):
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(BaseHandler):
    """Fallback for unknown routes: 404 with ARM error JSON."""

    control_plane = False

    def _not_found(self, *args: Any, **kwargs: Any) -> None:
        self.send_arm_error(
            404,
            "NotFound",
            f"The emulator does not serve {self.request.method} {self.request.path}",
        )

    get = post = put = patch = delete = head = _not_found


class BuildLogHandler(BaseHandler):
    """``GET /emulator/logs/{job}/azureml-logs/20_image_build_log.txt``."""

    control_plane = False

    def get(self, name: str) -> None:
        """Return the job's image build log as text.

        Parameters
        ----------
        name
            Job name.
        """
        job = self.engine.job(name)
        text = None
        if job.build_log_path:
            try:
                with open(job.build_log_path, "rb") as fh:
                    text = fh.read().decode("utf-8", "replace")
            except FileNotFoundError:
                text = None
        if text is None:
            raise ApiError(404, "NotFound", f"job {name} has no image build log")
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(text)
