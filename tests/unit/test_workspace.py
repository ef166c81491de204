"""Workspace settings cached in config.json, and their precedence (no network)."""

from __future__ import annotations

import json

import dask
import pytest
from _helpers import env_in_dask_config

from dask_amlcompute import ConfigurationError, write_workspace_config
from dask_amlcompute.backend.workspace import (
    cache_workspace,
    load_workspace_settings,
    ml_client_from_config,
    with_cached_compute,
)
from dask_amlcompute.config import resolve_settings

IDENTITY = {"subscription_id": "sub", "resource_group": "rg", "workspace_name": "ws"}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder as the cwd, with no compute in dask config."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DASK_AMLCOMPUTE__COMPUTE", raising=False)
    with dask.config.set({"amlcompute.compute": None}):
        yield tmp_path


def test_write_and_read_back(project):
    path = write_workspace_config(project, compute="cpu-cluster", **IDENTITY)
    assert path == project / "config.json"
    s = load_workspace_settings()
    assert (s.subscription_id, s.resource_group, s.workspace_name, s.compute) == (
        "sub",
        "rg",
        "ws",
        "cpu-cluster",
    )
    assert s.path == path
    assert json.loads(path.read_text())["dask_amlcompute"] == {"compute": "cpu-cluster"}


def test_write_merges_into_an_existing_file(project):
    downloaded = {**IDENTITY, "friendly_name": "from studio", "dask_amlcompute": {"other": 1}}
    (project / "config.json").write_text(json.dumps(downloaded))
    write_workspace_config(project / "config.json", compute="gpu")
    data = json.loads((project / "config.json").read_text())
    assert data["friendly_name"] == "from studio"  # other keys survive
    assert data["dask_amlcompute"] == {"other": 1, "compute": "gpu"}
    write_workspace_config(project, workspace_name="ws2")
    s = load_workspace_settings()
    assert s.compute == "gpu" and s.workspace_name == "ws2"


def test_new_file_needs_the_workspace_identity(project):
    with pytest.raises(ConfigurationError, match="subscription_id"):
        write_workspace_config(project, compute="cpu-cluster")


def test_found_in_parent_and_dot_azureml(project, monkeypatch):
    write_workspace_config(project / ".azureml", compute="from-dot-azureml", **IDENTITY)
    child = project / "notebooks" / "deep"
    child.mkdir(parents=True)
    assert load_workspace_settings(child) is None  # an explicit folder is not searched upwards
    monkeypatch.chdir(child)
    assert load_workspace_settings().compute == "from-dot-azureml"


def test_compute_precedence_argument_config_file(project, monkeypatch):
    write_workspace_config(project, compute="from-file", **IDENTITY)
    assert with_cached_compute(resolve_settings()).compute == "from-file"
    with env_in_dask_config(monkeypatch, "DASK_AMLCOMPUTE__COMPUTE", "from-env"):
        assert with_cached_compute(resolve_settings()).compute == "from-env"
    with dask.config.set({"amlcompute.compute": "from-config"}):
        assert with_cached_compute(resolve_settings()).compute == "from-config"
        assert resolve_settings(compute="from-argument").compute == "from-argument"


def test_workspace_config_setting_points_at_the_file(project, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = write_workspace_config(elsewhere / "ws.json", compute="elsewhere-compute", **IDENTITY)
    assert (
        with_cached_compute(resolve_settings(workspace_config=str(path))).compute
        == "elsewhere-compute"
    )


def test_no_compute_anywhere_is_a_clear_error(project):
    write_workspace_config(project, **IDENTITY)  # a file without a cached compute
    with pytest.raises(ConfigurationError, match=r"No compute given.*config\.json"):
        with_cached_compute(resolve_settings())


def test_broken_file_is_named(project):
    (project / "config.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match=r"config\.json"):
        with_cached_compute(resolve_settings())


def test_cache_workspace_from_an_ml_client(project):
    from azure.ai.ml import MLClient

    ml_client = MLClient(object(), "sub-1", "rg-1", "ws-1")  # sends no request
    cache_workspace(ml_client, project, compute="cpu-cluster")
    s = load_workspace_settings()
    assert (s.subscription_id, s.resource_group, s.workspace_name) == ("sub-1", "rg-1", "ws-1")
    assert with_cached_compute(resolve_settings()).compute == "cpu-cluster"
    client = ml_client_from_config(credential=object())
    assert (client.subscription_id, client.workspace_name) == ("sub-1", "ws-1")


def test_ml_client_from_config_names_a_file_without_the_workspace(project, tmp_path_factory):
    from dask_amlcompute import WorkspaceNotConfiguredError

    (project / "config.json").write_text(json.dumps({"subscription_id": "sub"}))
    with pytest.raises(WorkspaceNotConfiguredError, match=r"config\.json.*resource_group"):
        ml_client_from_config(credential=object())
    (project / "config.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match=r"config\.json"):
        ml_client_from_config(credential=object())
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(WorkspaceNotConfiguredError, match="write_workspace_config"):
        ml_client_from_config(empty, credential=object())
