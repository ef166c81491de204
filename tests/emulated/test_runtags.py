"""The node publishes run tags with one REST call per tag, as azureml-mlflow would send it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from distributed.utils import open_port

from dask_amlcompute.node.runtags import RunTagsError, tracking_api

SCOPE = (
    "/subscriptions/sub-1/resourceGroups/rg-1/providers/"
    "Microsoft.MachineLearningServices/workspaces/ws-1"
)


def test_azureml_uri_becomes_the_https_api_azureml_mlflow_calls():
    env = {
        "MLFLOW_TRACKING_URI": f"azureml://eastus.api.azureml.ms/mlflow/v1.0{SCOPE}",
        "MLFLOW_TRACKING_TOKEN": "a.b.c",
        "MLFLOW_RUN_ID": "job-1",
    }
    api = tracking_api(env)
    assert api is not None
    assert api.base == f"https://eastus.api.azureml.ms/mlflow/v2.0{SCOPE}"
    assert api.run_id == "job-1"
    assert api.headers == {"Authorization": "Bearer a.b.c"}
    assert "a.b.c" not in repr(api)  # the token stays out of logs


def test_plain_mlflow_server_and_what_only_the_mlflow_client_resolves():
    api = tracking_api({"MLFLOW_TRACKING_URI": "http://mlflow:5000/", "MLFLOW_RUN_ID": "r"})
    assert api is not None and api.base == "http://mlflow:5000" and not api.headers
    # azureml:// without a token, or a scheme it does not know: the mlflow client decides
    no_token = {"MLFLOW_TRACKING_URI": f"azureml://h/mlflow/v1.0{SCOPE}", "MLFLOW_RUN_ID": "r"}
    assert tracking_api(no_token) is None
    assert tracking_api({"MLFLOW_TRACKING_URI": "databricks", "MLFLOW_RUN_ID": "r"}) is None
    with pytest.raises(RunTagsError, match="inside an AML job"):
        tracking_api({"MLFLOW_RUN_ID": "r"})


def _publish(env: dict[str, str], tags: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import asyncio, sys; from dask_amlcompute.node.runtags import publish_tags; "
        f"asyncio.run(publish_tags({tags!r}))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SSL_CERT"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_publish_through_the_emulated_azureml_endpoint(emulator, ml_client):
    from azure.ai.ml import command
    from azure.ai.ml.entities import Environment

    job = ml_client.jobs.create_or_update(
        command(command="sleep 30", compute="cpu-cluster", environment=Environment(image="python"))
    )
    try:
        record = emulator._engine.jobs[job.name]
        env = {
            "MLFLOW_TRACKING_URI": emulator.node_tracking_uri,
            "MLFLOW_TRACKING_TOKEN": record.tracking_token,
            "MLFLOW_RUN_ID": job.name,
            "SSL_CERT_FILE": os.path.join(emulator.tempdir, "tracking-tls", "cert.pem"),
        }
        done = _publish(env, {"first": "1", "second": "2"})
        assert done.returncode == 0, done.stderr
        tags = ml_client.jobs.get(job.name).tags
        assert tags["first"] == "1" and tags["second"] == "2"
        # a wrong token is refused; the mlflow client (fallback) is refused as well: one error
        done = _publish({**env, "MLFLOW_TRACKING_TOKEN": "x.y.z"}, {"third": "3"})
        assert done.returncode != 0
        assert "publishing with the mlflow client" in done.stderr
        # a certificate this node does not trust: not retried, the mlflow client is tried
        done = _publish({k: v for k, v in env.items() if k != "SSL_CERT_FILE"}, {"fourth": "4"})
        assert done.returncode != 0 and "attempts" not in done.stderr
        assert "TLS error with https://" in done.stderr
        assert "publishing with the mlflow client" in done.stderr
    finally:
        ml_client.jobs.begin_cancel(job.name).result()


def test_unreachable_tracking_endpoint_fails_after_bounded_retries():
    port = open_port("127.0.0.1")
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_RUN_ID": "r"}
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # the fallback's own retries (minutes by default)
    done = _publish(env, {"k": "v"})
    assert done.returncode != 0
    assert f"no connection to http://127.0.0.1:{port} in 4 attempts" in done.stderr
    assert "publishing with the mlflow client" in done.stderr
