"""A small subset of the MLflow tracking REST API, backed by the emulator's jobs.

Each job is an MLflow run whose id is the job name, in an experiment whose id
and name are the job's ``experimentName``.  Tags set here show up in
``ml_client.jobs.get(name).tags``, as on AML.  Run status follows the job
(the job, not MLflow, decides when a run ends).
"""

from __future__ import annotations

import time
from typing import Any

import tornado.web

from . import identity
from .errors import ApiError
from .handlers import BaseHandler
from .state import JobRecord

_STATUS = {
    "Running": "RUNNING",
    "Completed": "FINISHED",
    "Failed": "FAILED",
    "Canceled": "KILLED",
    "CancelRequested": "RUNNING",
    "Finalizing": "RUNNING",
}

#: The workspace scope under AML's MLflow API versions.
WORKSPACE_SCOPE = (
    f"/subscriptions/{identity.SUBSCRIPTION_ID}/resourceGroups/{identity.RESOURCE_GROUP}"
    f"/providers/{identity.PROVIDER}/workspaces/{identity.WORKSPACE_NAME}"
)
#: URL prefix under which the MLflow API is served (the tracking URI's path). AML
#: serves ``/mlflow/v1.0`` (mlflow 1.x clients) and ``/mlflow/v2.0`` (what
#: azureml-mlflow sends for mlflow >= 2: its ``AzureMLRestStore.get_host_credentials``).
MLFLOW_PREFIX = "/mlflow/v1.0" + WORKSPACE_SCOPE


def azureml_tracking_uri(netloc: str) -> str:
    """The ``azureml://`` tracking URI AML gives a job's nodes, for the endpoint at ``netloc``.

    On AML: ``azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/...``;
    clients call ``https://<netloc>/mlflow/v2.0/<scope>/api/2.0/mlflow/...`` with
    the job's ``MLFLOW_TRACKING_TOKEN`` (azureml-mlflow 1.62,
    ``_internal/utils.py`` ``get_service_context_from_tracking_url_mlflow_env_vars``).
    """
    return f"azureml://{netloc}{MLFLOW_PREFIX}"


def tracking_uri(base_url: str) -> str:
    """Return the MLflow tracking URI of the emulated workspace.

    Parameters
    ----------
    base_url
        Emulator base URL.

    Returns
    -------
    str
        ``{base_url}/mlflow/v1.0/subscriptions/.../workspaces/emulator-ws``.
    """
    return base_url.rstrip("/") + MLFLOW_PREFIX


def _ms(ts: float | None) -> int | None:
    return None if ts is None else int(ts * 1000)


def run_info(job: JobRecord) -> dict[str, Any]:
    """Return MLflow ``RunInfo`` JSON for a job.

    Parameters
    ----------
    job
        The job.

    Returns
    -------
    dict
        The run info.
    """
    exp = job.experiment_name
    info = {
        "run_id": job.name,
        "run_uuid": job.name,
        "run_name": job.display_name,
        "experiment_id": exp,
        "user_id": "emulator",
        "status": _STATUS.get(job.status, "SCHEDULED"),
        "start_time": _ms(job.start_time or job.created),
        "artifact_uri": f"file:///dev/null/{job.name}",
        "lifecycle_stage": "active",
    }
    if job.end_time:
        info["end_time"] = _ms(job.end_time)
    return info


def run_json(job: JobRecord) -> dict[str, Any]:
    """Return MLflow ``Run`` JSON for a job.

    Parameters
    ----------
    job
        The job.

    Returns
    -------
    dict
        ``{"info": ..., "data": ..., "inputs": {}}``.
    """
    metrics = [m[-1] for m in job.mlflow_metrics.values() if m]
    return {
        "info": run_info(job),
        "data": {
            "tags": [{"key": k, "value": v} for k, v in job.tags.items()],
            "params": [{"key": k, "value": v} for k, v in job.mlflow_params.items()],
            "metrics": metrics,
        },
        "inputs": {},
    }


class MlflowHandler(BaseHandler):
    """Base for MLflow routes: MLflow-style errors, no injected faults."""

    control_plane = False
    run_history = True
    #: The job whose token the request carries (node-facing endpoint only).
    token_job: JobRecord | None = None

    def initialize(self, ctx: Any, require_token: bool = False) -> None:
        """Receive the context; ``require_token``: the node-facing ``azureml://`` endpoint.

        Parameters
        ----------
        ctx
            Shared context.
        require_token
            Answer 401 without a job's ``MLFLOW_TRACKING_TOKEN`` as bearer token, and
            403 when a job writes to another job's run.
        """
        super().initialize(ctx)
        self.require_token = require_token

    async def prepare(self) -> None:
        """Check the bearer token on the node-facing endpoint (AML answers 401 without one)."""
        await super().prepare()
        if self._finished or not self.require_token:
            return
        auth = self.request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        self.token_job = next(
            (j for j in self.engine.jobs.values() if token and j.tracking_token == token), None
        )
        if self.token_job is None:
            self.send_mlflow_error(
                401, "UNAUTHENTICATED", "Missing or invalid bearer token for the tracking service."
            )

    def send_mlflow_error(self, status: int, code: str, message: str) -> None:
        """Finish with an MLflow error body.

        Parameters
        ----------
        status
            HTTP status.
        code
            MLflow error code (``RESOURCE_DOES_NOT_EXIST``...).
        message
            Message.
        """
        self.send_json({"error_code": code, "message": message}, status)

    def find_run(self, run_id: Any) -> JobRecord | None:
        """Return the job backing ``run_id`` or answer 404.

        Parameters
        ----------
        run_id
            Run id from the request.

        Returns
        -------
        JobRecord or None
            None when an error response was sent.
        """
        job = self.engine.jobs.get(str(run_id)) if run_id else None
        if job is None:
            self.send_mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Run '{run_id}' not found.")
        return job

    def body_or_error(self) -> dict[str, Any] | None:
        """Parse a JSON object body or answer 400.

        Returns
        -------
        dict or None
            None when an error response was sent.
        """
        try:
            body = self.json_body()
        except ApiError as exc:
            self.send_mlflow_error(400, "MALFORMED_REQUEST", exc.message)
            return None
        if not isinstance(body, dict):
            self.send_mlflow_error(400, "MALFORMED_REQUEST", "body must be a JSON object")
            return None
        return body


class RunGetHandler(MlflowHandler):
    """``GET runs/get?run_id=``."""

    def get(self, **_: str) -> None:
        """Return the run."""
        job = self.find_run(
            self.get_argument("run_id", None) or self.get_argument("run_uuid", None)
        )
        if job is not None:
            self.send_json({"run": run_json(job)})


class RunWriteHandler(MlflowHandler):
    """``POST runs/{set-tag,delete-tag,log-metric,log-parameter,log-batch,update}``."""

    def post(self, action: str, **_: str) -> None:
        """Apply the write to the job's run.

        Parameters
        ----------
        action
            The MLflow action from the URL.
        """
        body = self.body_or_error()
        if body is None:
            return
        job = self.find_run(body.get("run_id") or body.get("run_uuid"))
        if job is None:
            return
        if self.require_token and self.token_job is not None and job is not self.token_job:
            self.send_mlflow_error(
                403,
                "PERMISSION_DENIED",
                f"The token of run '{self.token_job.name}' cannot write to run '{job.name}'.",
            )
            return
        try:
            self._apply(job, action, body)
        except (TypeError, ValueError, AttributeError) as exc:
            self.send_mlflow_error(
                400, "INVALID_PARAMETER_VALUE", f"invalid {action} request: {exc}"
            )
            return
        if action == "update":
            self.send_json({"run_info": run_info(job)})
        else:
            self.send_json({})

    def _apply(self, job: JobRecord, action: str, body: dict[str, Any]) -> None:
        if action == "set-tag":
            job.mlflow_tags[str(body.get("key"))] = str(body.get("value", ""))
        elif action == "delete-tag":
            job.mlflow_tags.pop(str(body.get("key")), None)
        elif action == "log-parameter":
            job.mlflow_params[str(body.get("key"))] = str(body.get("value", ""))
        elif action == "log-metric":
            self._metric(job, body)
        elif action == "log-batch":
            for m in body.get("metrics") or []:
                self._metric(job, m)
            for p in body.get("params") or []:
                job.mlflow_params[str(p.get("key"))] = str(p.get("value", ""))
            for t in body.get("tags") or []:
                job.mlflow_tags[str(t.get("key"))] = str(t.get("value", ""))

    @staticmethod
    def _metric(job: JobRecord, m: dict[str, Any]) -> None:
        key = str(m.get("key"))
        entry = {
            "key": key,
            "value": float(m.get("value", 0.0)),
            "timestamp": int(m.get("timestamp") or time.time() * 1000),
            "step": int(m.get("step") or 0),
        }
        job.mlflow_metrics.setdefault(key, []).append(entry)


class MetricHistoryHandler(MlflowHandler):
    """``GET metrics/get-history?run_id=&metric_key=``."""

    def get(self, **_: str) -> None:
        """Return a metric's history."""
        job = self.find_run(
            self.get_argument("run_id", None) or self.get_argument("run_uuid", None)
        )
        if job is not None:
            key = self.get_argument("metric_key", "")
            self.send_json({"metrics": job.mlflow_metrics.get(key, [])})


class ExperimentHandler(MlflowHandler):
    """``GET experiments/get-by-name`` and ``experiments/get``: one experiment per name."""

    def get(self, action: str, **_: str) -> None:
        """Return the experiment named after the job's ``experimentName``.

        Parameters
        ----------
        action
            ``get-by-name`` or ``get``.
        """
        name = self.get_argument(
            "experiment_name" if action == "get-by-name" else "experiment_id", ""
        )
        known = {j.experiment_name for j in self.engine.jobs.values()}
        if name not in known:
            self.send_mlflow_error(
                404, "RESOURCE_DOES_NOT_EXIST", f"Experiment '{name}' does not exist."
            )
            return
        self.send_json(
            {
                "experiment": {
                    "experiment_id": name,
                    "name": name,
                    "lifecycle_stage": "active",
                    "artifact_location": f"file:///dev/null/{name}",
                    "tags": [],
                }
            }
        )


def mlflow_routes(ctx: Any, require_token: bool = False) -> list[tuple[str, type, dict[str, Any]]]:
    """Return the tornado routes of the MLflow subset.

    Parameters
    ----------
    ctx
        Shared handler context, a ``ServerContext``.
    require_token
        Routes of the node-facing endpoint (see :meth:`MlflowHandler.initialize`).

    Returns
    -------
    list
        ``(pattern, handler, kwargs)`` tuples.
    """
    api = r"(?i)/mlflow/v[12]\.0" + WORKSPACE_SCOPE.replace(".", r"\.") + r"/api/2\.0/mlflow"
    kw = {"ctx": ctx, "require_token": require_token}
    return [
        (api + r"/runs/get", RunGetHandler, kw),
        (
            api + r"/runs/(?P<action>set-tag|delete-tag|log-metric|log-parameter|log-batch|update)",
            RunWriteHandler,
            kw,
        ),
        (api + r"/metrics/get-history", MetricHistoryHandler, kw),
        (api + r"/experiments/(?P<action>get-by-name|get)", ExperimentHandler, kw),
    ]


class _TrackingNotFound(MlflowHandler):
    """Anything else on the tracking endpoint: MLflow's 404."""

    async def prepare(self) -> None:
        """Answer 404 for every method."""
        self.send_mlflow_error(404, "ENDPOINT_NOT_FOUND", f"No such endpoint: {self.request.path}")


def make_tracking_app(ctx: Any) -> tornado.web.Application:
    """The node-facing tracking endpoint (the host of the jobs' ``azureml://`` URI).

    Only the MLflow routes, each requiring a job's ``MLFLOW_TRACKING_TOKEN``.

    Parameters
    ----------
    ctx
        Shared handler context, a ``ServerContext``.

    Returns
    -------
    tornado.web.Application
        The application.
    """
    return tornado.web.Application(
        mlflow_routes(ctx, require_token=True),
        default_handler_class=_TrackingNotFound,
        default_handler_args={"ctx": ctx, "require_token": False},
        compress_response=False,
    )
