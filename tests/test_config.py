"""Config defaults, schema and settings resolution (no network)."""

from __future__ import annotations

import dask
import pytest
import yaml
from _helpers import env_in_dask_config

from dask_amlcompute import ConfigurationError
from dask_amlcompute.config import (
    DEFAULTS_FILE,
    SCHEMA_FILE,
    ClusterSettings,
    config_key,
    resolve_settings,
)


def test_defaults_and_schema_have_the_same_keys():
    with open(DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)["amlcompute"]
    with open(SCHEMA_FILE) as f:
        schema = yaml.safe_load(f)["properties"]["amlcompute"]["properties"]
    assert set(defaults) == set(schema)


def test_every_setting_has_a_config_key():
    with open(DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)["amlcompute"]
    settings_keys = {config_key(f) for f in ClusterSettings.__dataclass_fields__}
    assert settings_keys == set(defaults)


def test_arguments_override_config_which_overrides_defaults():
    with dask.config.set({"amlcompute.compute": "from-config", "amlcompute.n-nodes": 5}):
        s = resolve_settings(n_nodes=3)
        assert s.compute == "from-config"
        assert s.n_nodes == 3
        assert s.processes_per_node == 1  # package default
        assert s.job_timeout == 7200.0


def test_env_var_config(monkeypatch):
    with env_in_dask_config(monkeypatch, "DASK_AMLCOMPUTE__COMPUTE", "env-compute"):
        assert resolve_settings().compute == "env-compute"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "No compute given"),
        ({"compute": "c", "n_nodes": 0}, "n_nodes must be a positive integer"),
        ({"compute": "c", "processes_per_node": -1}, "processes_per_node"),
        ({"compute": "c", "job_timeout": "soon"}, "Invalid job_timeout"),
        ({"compute": "c", "startup_timeout": "-5"}, "Invalid startup_timeout"),
        ({"compute": "c", "name": "has space"}, "Invalid cluster name"),
        ({"compute": "c", "experiment_name": "bad/name"}, "Invalid experiment_name"),
        ({"compute": "c", "connect": "telepathy"}, "connect must be"),
        ({"compute": "c", "distribution": "horovod"}, "distribution must be"),
        ({"compute": "c", "tags": ["x"]}, "tags must be a mapping"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        resolve_settings(**kwargs)


def test_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match="Unknown settings: n_gpus"):
        resolve_settings(compute="c", n_gpus=1)


def test_default_name_is_a_valid_aml_name():
    s = resolve_settings(compute="c")
    assert s.name.startswith("dask-")
    assert resolve_settings(compute="c").name != s.name
