"""Set run tags on the job's own MLflow run, where the client reads them.

One ``runs/set-tag`` call of the MLflow REST API per tag, with tornado's HTTP client
(``import mlflow`` would cost about a second of every start, issue #17). AML sets
``MLFLOW_TRACKING_URI`` (``azureml://<region>.api.azureml.ms/mlflow/v1.0/<scope>``) and
``MLFLOW_TRACKING_TOKEN``: :func:`tracking_api` makes them ``https://<host>/mlflow/v2.0/<scope>``
with a bearer token, as ``azureml-mlflow`` 1.62 does (``get_host_credentials``); an
``http(s)://`` URI is the API itself. Where the REST call is refused (4xx but 429, TLS)
or cannot connect, the mlflow client publishes instead, with a warning.
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
    """The MLflow REST API (``base`` + ``/api/2.0/mlflow/...``) of the run; ``headers`` never logged."""

    base: str
    run_id: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


def tracking_api(env: Mapping[str, str] | None = None) -> TrackingApi | None:
    """The MLflow REST endpoint of this job's run, from the variables AML sets.

    None when only the mlflow client can resolve the tracking URI (``azureml://``
    without a token, another scheme). :class:`RunTagsError` outside a job.
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
    """Set ``tags`` on this job's MLflow run in order (the one a reader waits for last).

    Each call is retried (bounded) on 429, 5xx and connection errors.
    :class:`RunTagsError`: not in a job, or no path could set them.
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
            if 400 <= exc.code < 500 and exc.code != 429:  # 599: a timeout, retried
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
        delay = FIRST_BACKOFF * 2 ** (attempt - 1)
        logger.info("Setting run tag %r failed (%s); retrying in %.1fs", key, failure, delay)
        await asyncio.sleep(delay)


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
