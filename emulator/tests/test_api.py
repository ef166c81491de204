"""Control-plane API of the emulator through the real SDK and raw HTTP."""

from __future__ import annotations

import json

import pytest
import requests
from _emu_helpers import submit, wait_log

from aml_emulator import identity

WS_PATH = identity.workspace_id()


def _node_field(node, snake: str, camel: str):
    """Read a list_nodes field; azure-ai-ml 1.35.x leaves snake_case None (see DESIGN.md)."""
    value = getattr(node, snake, None)
    return value if value is not None else node.__dict__.get(camel)


def test_computes_list_and_get(ml):
    computes = {c.name: c for c in ml.compute.list()}
    assert set(computes) == {"cpu-cluster", "small", "warm", "my-ci", "aks"}
    cpu = ml.compute.get("cpu-cluster")
    assert cpu.type == "amlcompute"
    assert (cpu.max_instances, cpu.min_instances) == (4, 0)
    assert cpu.size == "STANDARD_DS3_V2"
    assert cpu.idle_time_before_scale_down == 120
    assert cpu.ssh_public_access_enabled is True
    assert cpu.ssh_settings.admin_username == "azureuser"
    assert cpu.location == identity.REGION
    assert ml.compute.get("small").ssh_public_access_enabled is False
    assert ml.compute.get("warm").tier == "low_priority"


def test_non_amlcompute_kinds_reported_as_such(ml):
    assert ml.compute.get("my-ci").type == "computeinstance"
    assert ml.compute.get("aks").type == "kubernetes"
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError) as info:
        submit(ml, "echo x", compute="aks")
    assert info.value.status_code == 400 and "Kubernetes" in str(info.value)


def test_unknown_compute_is_404(ml):
    from azure.core.exceptions import ResourceNotFoundError

    with pytest.raises(ResourceNotFoundError):
        ml.compute.get("does-not-exist")


@pytest.mark.slow
def test_list_nodes_fields_for_running_job(emu, ml):
    job = submit(ml, "echo ready; sleep 30", nodes=2, distribution={"type": "pytorch"})
    wait_log(emu, job.name, 1, "ready")
    try:
        nodes = list(ml.compute.list_nodes("cpu-cluster"))
        mine = [n for n in nodes if _node_field(n, "run_id", "runId") == job.name]
        assert len(mine) == 2
        expected = {n["ip"]: n for n in emu.job_nodes(job.name)}
        for node in mine:
            ip = _node_field(node, "private_ip_address", "privateIpAddress")
            assert ip in expected
            assert _node_field(node, "node_state", "nodeState") == "running"
            assert _node_field(node, "public_ip_address", "publicIpAddress") == "127.0.0.1"
            assert _node_field(node, "port", "port") == expected[ip]["ssh_port"] > 0
            assert _node_field(node, "node_id", "nodeId").startswith("tvmps_")
        assert ml.compute.get("cpu-cluster")  # still answers while running
    finally:
        ml.jobs.begin_cancel(job.name).result(timeout=30)


def test_list_nodes_reports_min_nodes_idle(ml):
    nodes = list(ml.compute.list_nodes("warm"))
    idle = [n for n in nodes if _node_field(n, "node_state", "nodeState") == "idle"]
    assert len(idle) >= 1
    assert all(_node_field(n, "run_id", "runId") is None for n in idle)


def test_environments_latest_version_and_inline(ml):
    assert ml.environments.get("dask-env", version="1").image == "python:3.10"
    latest = ml.environments.get("dask-env", label="latest")
    assert (latest.version, latest.image) == ("2", "python:3.11")
    from azure.ai.ml.entities import Environment

    created = ml.environments.create_or_update(
        Environment(name="custom-env", version="7", image="ubuntu:22.04")
    )
    assert created.version == "7"
    assert ml.environments.get("custom-env", version="7").image == "ubuntu:22.04"
    from azure.core.exceptions import ResourceNotFoundError

    with pytest.raises(ResourceNotFoundError):
        ml.environments.get("dask-env", version="99")


def test_job_with_environment_at_latest(emu, ml):
    job = submit(ml, "echo latest", environment="dask-env@latest")
    assert ml.jobs.get(job.name).environment == "dask-env:2"
    assert emu.wait_job(job.name, 20) == "Completed"


def test_job_with_unknown_environment_rejected(ml):
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError) as info:
        submit(ml, "echo x", environment="azureml:dask-env:42")
    assert info.value.status_code == 404


def test_unknown_route_is_arm_404_json(emu):
    for method, path in [
        ("GET", "/nope"),
        ("POST", WS_PATH + "/pipelines/x"),
        ("DELETE", "/subscriptions/x"),
    ]:
        r = requests.request(method, emu.base_url + path, timeout=10)
        assert r.status_code == 404
        assert set(r.json()["error"]) >= {"code", "message"}


def test_unsupported_method_is_arm_405_json(emu):
    r = requests.post(f"{emu.base_url}{WS_PATH}/computes/cpu-cluster", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "MethodNotAllowed"
    # DELETE is served (compute delete): without its required parameter it is a 400
    r = requests.delete(f"{emu.base_url}{WS_PATH}/computes/cpu-cluster", timeout=10)
    assert r.status_code == 400 and "underlyingResourceAction" in r.json()["error"]["message"]


def test_wrong_workspace_is_404(emu):
    path = WS_PATH.replace(identity.WORKSPACE_NAME, "other-ws") + "/jobs"
    r = requests.get(emu.base_url + path, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound"


def test_malformed_body_is_arm_400_json(emu):
    url = f"{emu.base_url}{WS_PATH}/jobs/bad-body-job?api-version=2025-01-01-preview"
    r = requests.put(url, data=b"{not json", timeout=10)
    assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]
    r = requests.put(url, json={"properties": {"jobType": "Pipeline"}}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "BadRequest"
    r = requests.put(url, json=[1, 2], timeout=10)
    assert r.status_code == 400
    r = requests.put(
        url,
        json={
            "properties": {
                "jobType": "Command",
                "command": "x",
                "computeId": "cpu-cluster",
                "environmentId": "e",
                "limits": {"timeout": "soon"},
            }
        },
        timeout=10,
    )
    assert r.status_code == 400 and "duration" in r.json()["error"]["message"]


def test_missing_job_is_404(ml):
    from azure.core.exceptions import ResourceNotFoundError

    with pytest.raises(ResourceNotFoundError):
        ml.jobs.get("no-such-job")


@pytest.mark.parametrize("status,retry_after", [(503, None), (429, 0.1), (500, None)])
def test_injected_errors_are_retried_by_sdk(emu, ml, status, retry_after):
    emu.inject_http_errors(2, status=status, retry_after=retry_after)
    assert ml.compute.get("cpu-cluster").name == "cpu-cluster"
    assert emu.pending_http_errors() == 0


def test_injected_errors_visible_over_raw_http(emu):
    emu.inject_http_errors(1, status=429, retry_after=2)
    r = requests.get(f"{emu.base_url}{WS_PATH}/computes", timeout=10)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    assert r.json()["error"]["code"] == "TooManyRequests"
    assert requests.get(f"{emu.base_url}{WS_PATH}/computes", timeout=10).status_code == 200


def test_job_submit_survives_injected_errors(emu, ml):
    emu.inject_http_errors(3, status=503)
    job = submit(ml, "echo ok")
    assert emu.wait_job(job.name, 20) == "Completed"


def test_workspace_get_and_status_page(emu, ml):
    ws = ml.workspaces.get(identity.WORKSPACE_NAME)
    assert ws.name == identity.WORKSPACE_NAME and ws.location == identity.REGION
    # with azureml-mlflow installed, azure-ai-ml rewrites it to the v2.0 API (both served)
    v2 = emu.tracking_uri.replace("/mlflow/v1.0/", "/mlflow/v2.0/")
    assert ws.mlflow_tracking_uri in (emu.tracking_uri, v2)
    status = requests.get(emu.base_url + "/emulator/status", timeout=10).json()
    assert status["workspace_name"] == identity.WORKSPACE_NAME
    assert status["computes"]["cpu-cluster"]["max_nodes"] == 4
    json.dumps(status)
