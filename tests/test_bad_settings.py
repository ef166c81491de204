"""Every bad setting is refused with a typed error before anything is submitted (issue #13).

One table pairs each setting of ``amlcompute-schema.yaml`` with bad values and the
error they must raise; a new setting without a case fails :func:`test_table_covers_every_setting`.
Each case builds a cluster against the session emulator and checks, through the
emulator's request counts (``GET /emulator/status``), that no job was PUT and no
node started.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import pytest
import requests
import yaml
from _helpers import FAST_CLUSTER

from dask_amlcompute import (
    AmlComputeCluster,
    ComputeNotFoundError,
    ConfigurationError,
    EnvironmentNotFoundError,
)
from dask_amlcompute.config import SCHEMA_FILE, ClusterSettings

#: A registered environment the "environments that exist" lists must name.
KNOWN_ENV = "bad-settings-env"


@dataclass(frozen=True)
class Case:
    """A bad value of one setting and the error it must raise."""

    key: str
    bad: Any
    error: type[Exception] = ConfigurationError
    #: Extra text the message must contain (the setting's name always must).
    match: str = ""

    @property
    def id(self) -> str:
        return f"{self.key}={self.bad!r}"[:60]


CASES = [
    Case("compute", 42),
    Case("compute", "no-such-compute", ComputeNotFoundError, "cpu-cluster"),
    Case("n_nodes", 0),
    Case("n_nodes", 2.0),
    Case("nodes_per_job", "2"),
    Case("processes_per_node", True),
    Case("threads_per_process", 0),
    Case("memory_limit", "lots", match="'lots'"),
    Case("memory_limit", "-4GiB"),
    Case("memory_limit", -0.5),
    Case("memory_limit", 100, match="unit"),
    Case("memory_limit", True),
    Case("memory_limit", float("nan")),
    Case("worker_on_scheduler", "no"),
    Case("environment", "missing-env@latest", EnvironmentNotFoundError, KNOWN_ENV),
    Case("environment", "missing-env:7", EnvironmentNotFoundError, KNOWN_ENV),
    Case("environment", "azureml:missing-env:7", EnvironmentNotFoundError, KNOWN_ENV),
    Case("environment", "azureml:missing-env@latest", EnvironmentNotFoundError, KNOWN_ENV),
    Case("environment", f"{KNOWN_ENV}:99", EnvironmentNotFoundError, "versions: 1"),
    Case("environment", "my-env", match="no version"),
    Case("environment", "my-env@prod", match="latest"),
    Case("environment", "my env:1"),
    Case("environment", 42),
    Case("job_timeout", "soon"),
    Case("startup_timeout", "-5"),
    Case("prepare_timeout", "eventually"),
    Case("queue_timeout", "eventually"),
    Case("experiment_name", "bad/name"),
    Case("name", "has space"),
    Case("name", "x" * 300),
    Case("tags", {"a": 1}, match="'a'"),
    Case("tags", ["x"]),
    Case("tags", {"": "empty key"}),
    Case("env_vars", {"BAD NAME": "1"}, match="BAD NAME"),
    Case("env_vars", {"A=B": "1"}, match="A=B"),
    Case("env_vars", {"A": 1}, match="string"),
    Case("env_vars", {"1ABC": "x"}),
    Case("env_vars", "A=1"),
    Case("distribution", "horovod"),
    Case("scheduler_port", 70000),
    Case("scheduler_port", True),
    Case("dashboard_port", -1),
    Case("death_timeout", "never"),
    Case("no_client_timeout", "later"),
    Case("idle_timeout", 0),
    Case("security", "yes"),
    Case("connect", "telepathy"),
    Case("ssh_key", "/nonexistent/dask-amlcompute/id_ed25519", match="no such file"),
    Case("ssh_key", 42),
    Case("known_hosts", 42),
    Case("ssh_trust_on_first_use", 1),
    Case("watch_interval", "often"),
    Case("poll_interval", -1),
    Case("scheduler_options", ["idle_timeout"]),
    Case("scheduler_options", {"plugin": object()}, match="JSON"),
    Case("worker_options", {1: 2}),
    Case("workspace_config", "/nonexistent/dask-amlcompute/config.json"),
    Case("pip_packages", "scikit-learn", match="list"),
    Case("pip_packages", ["numpy>>1"], match="numpy>>1"),
    Case("pip_packages", [""]),
    Case("conda_packages", [1]),
    Case("conda_packages", "gcc"),
    Case("node_package", ""),
    Case("node_package", 3),
    Case("version_check", "maybe"),
    Case("quiet", "no"),
    Case("create_compute", "big"),
    Case("create_compute", {"size": "Standard_D4s_v3", "max_nodes": 0}, match="max_nodes"),
    Case("delete_compute_on_close", "sometimes"),
    Case("instance_type", "Standard_D4s_v3", match="leave compute unset"),
    Case("job_tier", "premium"),
    Case("serverless_network", "yes"),
    Case("worker_compute", 42),
    Case("worker_compute", "no-such-compute", ComputeNotFoundError, "cpu-cluster"),
    Case("gpu_workers", "all"),
]


def schema_settings() -> set[str]:
    """Attribute names of every key of ``amlcompute-schema.yaml``."""
    with open(SCHEMA_FILE) as f:
        keys = yaml.safe_load(f)["properties"]["amlcompute"]["properties"]
    return {key.replace("-", "_") for key in keys}


def test_table_covers_every_setting():
    covered = {case.key for case in CASES}
    assert schema_settings() == {f.name for f in fields(ClusterSettings)}
    missing = schema_settings() - covered
    assert not missing, f"settings without a bad-value case: {sorted(missing)}"
    assert covered <= schema_settings(), f"cases of no setting: {covered - schema_settings()}"


def test_environment_not_found_is_a_configuration_and_lookup_error():
    assert issubclass(EnvironmentNotFoundError, ConfigurationError)
    assert issubclass(EnvironmentNotFoundError, LookupError)


@pytest.fixture(scope="module")
def known_environment(ml_client):
    """``bad-settings-env:1`` plus an anonymous environment (never listed) in the workspace."""
    from azure.ai.ml.entities import Environment

    ml_client.environments.create_or_update(
        Environment(name=KNOWN_ENV, version="1", image="docker.io/library/python:3.11")
    )
    ml_client.environments.create_or_update(Environment(image="docker.io/library/python:3.12"))
    return KNOWN_ENV


def emulator_state(emulator) -> dict[str, Any]:
    """Request counts, jobs and node count of the emulator, through its status route."""
    status = requests.get(
        emulator.base_url + "/emulator/status", timeout=10, verify=emulator.cert_path or True
    ).json()
    return {
        "writes": {k: v for k, v in status["requests"].items() if not k.startswith("GET ")},
        "jobs": set(status["jobs"]),
        "nodes": sum(len(job["nodes"]) for job in status["jobs"].values()),
    }


def test_the_status_route_counts_job_puts(emulator, ml_client):
    from azure.ai.ml import command
    from azure.ai.ml.entities import Environment

    before = emulator_state(emulator)
    job = command(
        command="true",
        compute="cpu-cluster",
        environment=Environment(image="docker.io/library/python:3.11"),
        experiment_name="bad-settings",
    )
    created = ml_client.jobs.create_or_update(job)
    emulator.wait_job(created.name, timeout=60)
    after = emulator_state(emulator)
    assert after["writes"].get("PUT JobHandler", 0) == before["writes"].get("PUT JobHandler", 0) + 1
    assert created.name in after["jobs"] - before["jobs"]
    assert after["nodes"] == before["nodes"] + 1


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_setting_is_refused_before_submit(case, emulator, ml_client, known_environment):
    kwargs = {"compute": "cpu-cluster", "job_timeout": "10m", **FAST_CLUSTER}
    if case.key != "name":
        kwargs["name"] = "bad-settings"
    kwargs[case.key] = case.bad
    before = emulator_state(emulator)
    with pytest.raises(case.error) as info:
        AmlComputeCluster(ml_client, **kwargs)
    message = str(info.value)
    assert type(info.value) is case.error
    if case.error is not ComputeNotFoundError:
        assert case.key in message, message
    assert case.match in message, message
    if case.error is EnvironmentNotFoundError:
        # "azureml:name@latest" is normalised to "name@latest" (what azure-ai-ml resolves)
        assert case.bad.removeprefix("azureml:").split("@")[0] in message
        assert "CliV2AnonymousEnvironment" not in message
    after = emulator_state(emulator)
    assert after["writes"] == before["writes"], "the emulator received a write (a job PUT?)"
    assert after["jobs"] == before["jobs"], "a job was created"
    assert after["nodes"] == before["nodes"], "a node was started"


@pytest.mark.parametrize(
    "key, good",
    [
        ("memory_limit", "4GiB"),
        ("memory_limit", 0.5),
        ("memory_limit", "0.25"),
        ("memory_limit", 0),
        ("memory_limit", 8 * 2**30),
        ("environment", f"azureml:{KNOWN_ENV}@latest"),
        ("env_vars", {"_PRIVATE": "", "OMP_NUM_THREADS": "1"}),
    ],
)
def test_good_values_still_pass_the_checks(key, good):
    from dask_amlcompute.config import resolve_settings

    settings = resolve_settings(compute="cpu-cluster", **{key: good})
    value = getattr(settings, key)
    assert value == (f"{KNOWN_ENV}@latest" if key == "environment" else good)


# -- the emulator routes the environment check relies on -------------------------------


def test_environment_list_and_unknown_version_through_the_sdk(ml_client, known_environment):
    from azure.core.exceptions import ResourceNotFoundError

    listed = {e.name: e.latest_version for e in ml_client.environments.list()}
    assert listed[KNOWN_ENV] == "1"
    assert "CliV2AnonymousEnvironment" in listed  # the SDK lists it; dask-amlcompute skips it
    assert [e.version for e in ml_client.environments.list(name=KNOWN_ENV)] == ["1"]
    with pytest.raises(ResourceNotFoundError):
        ml_client.environments.get(KNOWN_ENV, version="7")
    with pytest.raises(ResourceNotFoundError):
        ml_client.environments.get("missing-env", version="7")


def test_emulator_refuses_a_job_naming_a_missing_environment_version(
    emulator, ml_client, known_environment
):
    from azure.ai.ml import command
    from azure.core.exceptions import ResourceNotFoundError

    before = emulator_state(emulator)
    job = command(
        command="true",
        compute="cpu-cluster",
        environment="missing-env:7",
        experiment_name="bad-settings",
    )
    with pytest.raises(ResourceNotFoundError, match="No environment exists for name: missing-env"):
        ml_client.jobs.create_or_update(job)
    after = emulator_state(emulator)
    assert after["writes"]["PUT JobHandler"] == before["writes"].get("PUT JobHandler", 0) + 1
    assert after["jobs"] == before["jobs"] and after["nodes"] == before["nodes"]
