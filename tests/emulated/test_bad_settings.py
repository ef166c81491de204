"""Settings that only the workspace can refuse are refused before anything is submitted.

A compute or environment that does not exist raises its typed error (issue #13).
Each case builds a cluster against the session emulator and checks, through the
emulator's request counts (``GET /emulator/status``), that no job was PUT and no
node started. Every other bad input is in ``tests/unit/test_bad_inputs.py`` (no emulator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import requests
from _helpers import FAST_CLUSTER

from dask_amlcompute import (
    AmlComputeCluster,
    ComputeNotFoundError,
    ConfigurationError,
    EnvironmentNotFoundError,
)

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
    Case("compute", "no-such-compute", ComputeNotFoundError, "cpu-cluster"),
    Case("environment", "missing-env@latest", EnvironmentNotFoundError, KNOWN_ENV),
    Case("environment", "missing-env:7", EnvironmentNotFoundError, KNOWN_ENV),
    Case("environment", "azureml:missing-env:7", EnvironmentNotFoundError, KNOWN_ENV),
    Case("environment", "azureml:missing-env@latest", EnvironmentNotFoundError, KNOWN_ENV),
    Case("environment", f"{KNOWN_ENV}:99", EnvironmentNotFoundError, "versions: 1"),
    Case("worker_compute", "no-such-compute", ComputeNotFoundError, "cpu-cluster"),
    # one of the settings refused before any lookup (tests/unit/test_bad_inputs.py has them all)
    Case("n_nodes", 0),
]


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
    # the plan registers the code snapshot beside its look-ups (found or uploaded by hash, as
    # a job PUT would): that is no submission
    writes = {k: v for k, v in status["requests"].items() if not k.startswith("GET ")}
    return {
        "writes": {k: v for k, v in writes.items() if "Code" not in k},
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
