"""Set run tags on the job's own MLflow run, where the client reads them.

The scheduler node publishes its address as run tags as soon as it listens, so
this is on the start-up path of every cluster. It posts the MLflow REST API's
``runs/set-tag`` itself, through tornado's HTTP client (already imported with
distributed), instead of importing the mlflow client: ``import mlflow`` (with
``azureml-mlflow``) takes about a second, the largest fixed cost of a cluster's
start-up (issue #17).

Inside an AML job, AML sets ``MLFLOW_TRACKING_URI`` to the workspace's
``azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.MachineLearningServices/workspaces/<ws>``
URI, ``MLFLOW_TRACKING_TOKEN`` to a token for the run, and ``MLFLOW_RUN_ID``.
``azureml-mlflow`` turns those into ``https://<host>/mlflow/v2.0/<workspace
scope>`` plus the MLflow API path, with ``Authorization: Bearer <token>``
(``azureml/mlflow/_store/azureml_reststore.py`` ``get_host_credentials`` and
``_internal/utils.py`` ``get_service_context_from_tracking_url_mlflow_env_vars``
in azureml-mlflow 1.62); :func:`tracking_api` does the same. For a plain
``http(s)://`` tracking URI (an MLflow server) the API sits under the URI.

Should the REST call be refused in a way that suggests the URL or the token is
not what this module expects (4xx), or fail to connect (TLS, or connection
errors that outlast the retries), the mlflow client (the documented path,
installed on the nodes by the default environment) publishes instead, and a
warning says so in the node's log. The body carries ``run_uuid`` as well as
``run_id``, as mlflow's ``RestStore`` sends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

logger = logging.getLogger("dask_amlcompute.node")

#: The workspace scope in an ``azureml://`` tracking URI's path.
_WORKSPACE_SCOPE = re.compile(
    r"(/subscriptions/[^/]+/resourceGroups/[^/]+"
    r"/providers/Microsoft\.MachineLearningServices/workspaces/[^/?]+)",
    re.IGNORECASE,
)
#: MLflow API version of AML's tracking service for mlflow 2.x/3.x clients.
AML_MLFLOW_API = "/mlflow/v2.0"
#: Attempts of one set-tag call on 429, 5xx or a connection error.
ATTEMPTS = 4
#: Seconds before the first retry (doubling).
FIRST_BACKOFF = 0.5
#: Seconds for one request.
REQUEST_TIMEOUT = 30.0


class RunTagsError(RuntimeError):
    """The run tags could not be set (no tracking settings, or every path failed)."""


@dataclass(frozen=True)
class TrackingApi:
    """Where and how to call the MLflow REST API of this job's run.

    Attributes
    ----------
    base
        URL the MLflow API paths (``/api/2.0/mlflow/...``) are appended to.
    run_id
        The run to tag.
    headers
        Request headers (the bearer token); never logged.
    """

    base: str
    run_id: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


def tracking_api(env: Mapping[str, str] | None = None) -> TrackingApi | None:
    """The MLflow REST endpoint of this job's run, from the variables AML sets.

    Returns
    -------
    TrackingApi or None
        None when the tracking URI is one only the mlflow client can resolve
        (an ``azureml://`` URI without ``MLFLOW_TRACKING_TOKEN``, another scheme).

    Raises
    ------
    RunTagsError
        ``MLFLOW_TRACKING_URI`` or the run id is not set (not inside a job).
    """
    env = os.environ if env is None else env
    run_id = env.get("MLFLOW_RUN_ID") or env.get("AZUREML_RUN_ID")
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not run_id or not uri:
        raise RunTagsError(
            "MLFLOW_TRACKING_URI / MLFLOW_RUN_ID are not set: the scheduler cannot publish its "
            "address. Is this running inside an AML job?"
        )
    token = env.get("MLFLOW_TRACKING_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return TrackingApi(uri.split("?")[0].rstrip("/"), run_id, headers)
    if parts.scheme == "azureml" and token:
        scope = _WORKSPACE_SCOPE.search(parts.path)
        if scope is not None:
            return TrackingApi(f"https://{parts.netloc}{AML_MLFLOW_API}{scope[1]}", run_id, headers)
    return None


async def publish_tags(tags: Mapping[str, str], env: Mapping[str, str] | None = None) -> None:
    """Set ``tags`` on this job's MLflow run, one by one in order.

    Put the tag a reader waits for last. Each call is retried (bounded) on
    429, 5xx and connection errors.

    Raises
    ------
    RunTagsError
        Not inside a job, or neither the REST API nor the mlflow client could
        set the tags.
    """
    env = os.environ if env is None else env
    api = tracking_api(env)
    if api is None:
        logger.info("Tracking URI needs the mlflow client: publishing run tags with it")
        await asyncio.to_thread(_publish_with_mlflow, tags, env)
        return
    try:
        for key, value in tags.items():
            await _set_tag(api, key, value)
    except _Refused as exc:
        logger.warning(
            "The MLflow REST API did not take a run tag (%s); publishing with the mlflow client",
            exc,
        )
        await asyncio.to_thread(_publish_with_mlflow, tags, env)


class _Refused(Exception):
    """The URL or the token is not what was expected: a 4xx other than 429, or no connection."""


async def _set_tag(api: TrackingApi, key: str, value: str) -> None:
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError

    client = AsyncHTTPClient()
    body = json.dumps({"run_id": api.run_id, "run_uuid": api.run_id, "key": key, "value": value})
    delay = FIRST_BACKOFF
    for attempt in range(1, ATTEMPTS + 1):
        try:
            await client.fetch(
                api.base + "/api/2.0/mlflow/runs/set-tag",
                method="POST",
                body=body,
                headers={**api.headers, "Content-Type": "application/json"},
                request_timeout=REQUEST_TIMEOUT,
            )
            return
        except HTTPClientError as exc:
            if exc.code != 599 and 400 <= exc.code < 500 and exc.code != 429:
                raise _Refused(f"HTTP {exc.code} from {api.base}") from None
            failure: Exception = exc
        except ssl.SSLError as exc:  # not a passing condition: no retry
            raise _Refused(f"TLS error with {api.base}: {exc}") from None
        except OSError as exc:  # connection refused/reset, name resolution
            failure = exc
        if attempt == ATTEMPTS and isinstance(failure, OSError):
            raise _Refused(f"no connection to {api.base} in {ATTEMPTS} attempts: {failure}")
        if attempt == ATTEMPTS:
            raise RunTagsError(
                f"Could not set run tag {key!r} at {api.base} after {ATTEMPTS} attempts: {failure}"
            ) from None
        logger.info("Setting run tag %r failed (%s); retrying in %.1fs", key, failure, delay)
        await asyncio.sleep(delay)
        delay *= 2


def _publish_with_mlflow(tags: Mapping[str, str], env: Mapping[str, str]) -> None:
    """Set the tags through the mlflow client (``azureml-mlflow`` resolves ``azureml://``)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise RunTagsError(
            f"Cannot publish run tags: {env.get('MLFLOW_TRACKING_URI')!r} needs the mlflow client "
            "(pip install mlflow-skinny azureml-mlflow in the job's environment)."
        ) from None
    run_id = env.get("MLFLOW_RUN_ID") or env.get("AZUREML_RUN_ID") or ""
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
