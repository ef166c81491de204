"""MLflow tag round trip, HTTPS mode, config files and the CLI."""

from __future__ import annotations

import json
import sys
import threading

import pytest
import requests
from _emu_helpers import submit

from aml_emulator import ComputeSpec, Emulator, load_config


def _mlflow_environment():
    """A job environment with mlflow and azureml-mlflow, built by the emulator as AML builds it."""
    from azure.ai.ml.entities import Environment

    py = "{}.{}".format(*sys.version_info[:2])
    conda = {
        "name": "mlflow-in-job",
        "channels": ["conda-forge"],
        "dependencies": [f"python={py}", "pip", {"pip": ["mlflow-skinny", "azureml-mlflow"]}],
    }
    return Environment(image="python:3.11-slim", conda_file=conda)


@pytest.mark.slow
def test_mlflow_set_tag_inside_job_appears_in_job_tags(emu, ml):
    cmd = (
        "python -c \"import mlflow; mlflow.set_tag('scheduler', 'tcp://node-0:8786'); "
        "mlflow.log_metric('m', 1.5); "
        "mlflow.log_param('p', 'v'); print('tagged')\""
    )
    # AML gives jobs an azureml:// tracking URI: only azureml-mlflow resolves it, so the job's
    # environment has it (built by the emulator, as AML builds it; not in the test extra,
    # whose resolver would backtrack through azureml-mlflow's pins)
    job = submit(ml, cmd, tags={"submitted": "yes"}, environment=_mlflow_environment())
    assert emu.wait_job(job.name, 240) == "Completed", emu.node_log(job.name, 0)
    tags = ml.jobs.get(job.name).tags
    assert tags["scheduler"] == "tcp://node-0:8786"
    assert tags["submitted"] == "yes"
    # The same run seen from the client side with the real mlflow client.
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=emu.tracking_uri).get_run(job.name)
    assert run.data.tags["scheduler"] == "tcp://node-0:8786"
    assert run.data.metrics["m"] == 1.5 and run.data.params["p"] == "v"
    assert run.info.status == "FINISHED"


def test_mlflow_unknown_run_is_404(emu):
    r = requests.get(
        emu.tracking_uri + "/api/2.0/mlflow/runs/get", params={"run_id": "nope"}, timeout=10
    )
    assert r.status_code == 404 and r.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    r = requests.post(emu.tracking_uri + "/api/2.0/mlflow/runs/set-tag", data=b"{", timeout=10)
    assert r.status_code == 400


def test_mlflow_bad_metric_value_is_400(emu, ml):
    job = submit(ml, "echo hi")
    r = requests.post(
        emu.tracking_uri + "/api/2.0/mlflow/runs/log-metric",
        json={"run_id": job.name, "key": "k", "value": "not-a-number"},
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error_code"] == "INVALID_PARAMETER_VALUE"


def test_tags_updated_through_sdk(emu, ml):
    job = submit(ml, "echo hi", tags={"a": "1"})
    emu.wait_job(job.name, 20)
    got = ml.jobs.get(job.name)
    got.tags["b"] = "2"
    ml.jobs.create_or_update(got)
    assert ml.jobs.get(job.name).tags == {"a": "1", "b": "2"}


@pytest.mark.slow
def test_https_mode_with_self_signed_certificate():
    with Emulator(computes=[ComputeSpec("cpu-cluster", max_nodes=1)], https=True) as emu:
        assert emu.base_url.startswith("https://127.0.0.1:") and emu.cert_path
        ml = emu.ml_client()
        assert ml.compute.get("cpu-cluster").max_instances == 1
        cmd = "python -c \"import mlflow; mlflow.set_tag('secure', 'yes')\""
        job = submit(ml, cmd, environment=_mlflow_environment())
        assert emu.wait_job(job.name, 240) == "Completed", emu.node_log(job.name, 0)
        assert ml.jobs.get(job.name).tags["secure"] == "yes"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(emu.base_url + "/emulator/status", timeout=10)
        assert requests.get(emu.base_url + "/emulator/status", verify=emu.cert_path, timeout=10).ok


def test_config_from_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "emu.yaml"
    yaml_file.write_text(
        "provisioning_delay: 0.5\n"
        "computes:\n"
        "  - {name: gpu, max_nodes: 3, vm_size: STANDARD_NC6, ssh_public_access: false}\n"
        "  - {name: ci, kind: ComputeInstance}\n"
        "environments:\n"
        "  - {name: env-a, version: '3', image: 'python:3.12'}\n"
    )
    cfg = load_config(yaml_file)
    assert cfg.provisioning_delay == 0.5
    assert [(c.name, c.kind, c.max_nodes) for c in cfg.computes] == [
        ("gpu", "AmlCompute", 3),
        ("ci", "ComputeInstance", 1),
    ]
    json_file = tmp_path / "emu.json"
    json_file.write_text(json.dumps({"computes": [{"name": "x", "max_nodes": 2}], "port": 0}))
    assert load_config(json_file).computes[0].max_nodes == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("computes: [{name: x, max_nodz: 2}]\n")
    with pytest.raises(ValueError, match="max_nodz"):
        load_config(bad)
    with Emulator.from_file(str(yaml_file)) as emu:
        ml = emu.ml_client()
        assert ml.compute.get("gpu").size == "STANDARD_NC6"
        assert ml.environments.get("env-a", version="3").image == "python:3.12"
        assert emu.provisioning_delay == 0.5


def test_config_rejects_non_loopback_and_bad_computes():
    from aml_emulator import EmulatorConfig

    with pytest.raises(ValueError, match="loopback"):
        EmulatorConfig(host="0.0.0.0")
    with pytest.raises(ValueError):
        ComputeSpec("x", max_nodes=0)
    with pytest.raises(ValueError):
        ComputeSpec("x", kind="Databricks")
    with pytest.raises(ValueError, match="duplicate"):
        EmulatorConfig(computes=[ComputeSpec("a"), ComputeSpec("a")])


def test_cli_runs_until_stopped(tmp_path, capsys):
    from aml_emulator import run_emulator_cli

    cfg = tmp_path / "emu.yaml"
    cfg.write_text("computes:\n  - {name: cli-cluster, max_nodes: 2}\n")
    ready, stop = threading.Event(), threading.Event()
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            run_emulator_cli(["--config", str(cfg)], ready=ready, stop=stop)
        )
    )
    thread.start()
    try:
        assert ready.wait(30)
        out = capsys.readouterr().out
        base_url = next(w for w in out.split() if w.startswith("http://127.0.0.1:"))
        assert "make_ml_client" in out
        status = requests.get(base_url + "/emulator/status", timeout=10).json()
        assert "cli-cluster" in status["computes"]
    finally:
        stop.set()
        thread.join(30)
    assert result == [0]
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(base_url + "/emulator/status", timeout=5)


def test_cli_reports_bad_config(tmp_path, capsys):
    from aml_emulator import run_emulator_cli

    assert run_emulator_cli(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def _tracking_api(emu) -> str:
    """The https URL azureml-mlflow derives from the nodes' azureml:// tracking URI."""
    rest = emu.node_tracking_uri.removeprefix("azureml://")
    netloc, _, path = rest.partition("/")
    return f"https://{netloc}/{path.replace('mlflow/v1.0', 'mlflow/v2.0', 1)}/api/2.0/mlflow"


def _tracking_ca(emu) -> str:
    import os

    return os.path.join(emu.tempdir, "tracking-tls", "cert.pem")


def test_node_tracking_endpoint_is_tls_with_a_run_token(emu, ml):
    """The nodes' azureml:// endpoint: TLS (a CA the nodes trust), a bearer token per run."""
    job = submit(ml, "echo hi")
    other = submit(ml, "echo hi")
    emu.wait_job(job.name, 20)
    emu.wait_job(other.name, 20)
    token = emu._engine.jobs[job.name].tracking_token  # what AML hands the job's nodes
    api, ca = _tracking_api(emu), _tracking_ca(emu)
    body = {"run_id": job.name, "key": "k", "value": "v"}
    with pytest.raises(requests.exceptions.SSLError):  # not a certificate anyone trusts
        requests.post(api + "/runs/set-tag", json=body, timeout=10)
    r = requests.post(api + "/runs/set-tag", json=body, timeout=10, verify=ca)
    assert r.status_code == 401, r.text  # no token
    bad = {"Authorization": "Bearer " + token[:-3] + "xyz"}
    r = requests.post(api + "/runs/set-tag", json=body, headers=bad, timeout=10, verify=ca)
    assert r.status_code == 401, r.text
    auth = {"Authorization": f"Bearer {token}"}
    r = requests.post(api + "/runs/set-tag", json=body, headers=auth, timeout=10, verify=ca)
    assert r.status_code == 200, r.text
    assert ml.jobs.get(job.name).tags["k"] == "v"
    # a run's token does not write to another run
    r = requests.post(
        api + "/runs/set-tag", json={**body, "run_id": other.name}, headers=auth, verify=ca
    )
    assert r.status_code == 403, r.text
    # only the MLflow API lives there
    r = requests.get(api.split("/mlflow/")[0] + "/jobs", headers=auth, timeout=10, verify=ca)
    assert r.status_code == 404
