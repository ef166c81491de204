"""Shared fixtures: a session-wide AML emulator and helpers for live (external) tests."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from _helpers import FAST_CLUSTER
from _ssh_helpers import write_client_key

EXTERNAL_VARS = (
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_RESOURCE_GROUP",
    "AZUREML_WORKSPACE_NAME",
    "AZUREML_COMPUTE",
)


def pytest_collection_modifyitems(config, items):
    missing = [v for v in EXTERNAL_VARS if not os.environ.get(v)]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"live Azure test: set {', '.join(missing)} to run")
    for item in items:
        if "external" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outside pytest-timeout: waiting is not run time
def pytest_runtest_protocol(item):
    """A test marked ``alone`` runs while the other test process runs nothing (pyproject's
    ``-n 2``): it keeps both cores busy by itself, and what ran beside it would crawl."""
    basetemp = getattr(item.config, "workerinput", None) and item.config.option.basetemp
    if not basetemp:  # one process: nothing runs beside
        yield
        return
    # the run's temporary folder (the workers' folders are in it): shared by both, cleaned by pytest
    with open(Path(basetemp).parent / "alone.lock", "a") as lock:
        alone = item.get_closest_marker("alone") is not None
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        yield


@pytest.fixture(scope="session")
def emulator():
    """One emulator for the session: computes for the cluster tests."""
    from aml_emulator import ComputeSpec, Emulator

    computes = [
        ComputeSpec(name="cpu-cluster", max_nodes=8, min_nodes=0),
        ComputeSpec(name="tiny", max_nodes=2, min_nodes=0),
        ComputeSpec(name="notebook-ci", kind="ComputeInstance"),
    ]
    with Emulator(computes=computes) as emu:
        yield emu


@pytest.fixture(scope="session")
def ml_client(emulator):
    return emulator.ml_client()


@pytest.fixture
def run_tags_withheld(emulator):
    """The emulator keeps mlflow run tags off job resources (run history only), then restores."""
    emulator.set_run_tags_on_job(False)
    try:
        yield emulator
    finally:
        emulator.set_run_tags_on_job(True)


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory):
    """A client key pair for public-SSH computes: ``(private key file, public key line)``."""
    return write_client_key(tmp_path_factory.mktemp("ssh"))


@pytest.fixture
def client_dask(monkeypatch):
    """Make this client look as if it ran another dask (what the GPU environment pins)."""
    import dask
    import distributed

    def use(version: str) -> None:
        monkeypatch.setattr(dask, "__version__", version)
        monkeypatch.setattr(distributed, "__version__", version)

    return use


@pytest.fixture
def cluster_kwargs():
    """Arguments that make a cluster start fast and fail fast on the emulator."""
    return {"compute": "cpu-cluster", "job_timeout": "10m", **FAST_CLUSTER}
