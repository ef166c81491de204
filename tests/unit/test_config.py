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
    checked,
    config_key,
    resolve_settings,
)


def test_defaults_and_schema_have_the_same_keys():
    with open(DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)["amlcompute"]
    with open(SCHEMA_FILE) as f:
        schema = yaml.safe_load(f)["properties"]["amlcompute"]["properties"]
    assert set(defaults) == set(schema)


#: Config keys that are no cluster setting (read where they apply).
CLIENT_KEYS = {"compute-instance", "compute-instance-file"}


def test_every_setting_has_a_config_key():
    with open(DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)["amlcompute"]
    settings_keys = {config_key(f) for f in ClusterSettings.__dataclass_fields__}
    assert settings_keys == set(defaults) - CLIENT_KEYS


def test_the_defaults_pass_the_schema():
    for key, value in dask.config.get("amlcompute").items():
        checked(key, value)


def test_unknown_config_keys_are_refused_with_the_closest_name():
    with (
        dask.config.set({"amlcompute.n-nodez": 3}),
        pytest.raises(ConfigurationError, match=r"n-nodez.*'n-nodes'"),
    ):
        resolve_settings(compute="c")
    with dask.config.set({"amlcompute.processes_per_node": 2}):  # dask's '_' spelling: known
        assert resolve_settings(compute="c").processes_per_node == 2


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
        ({"compute": "c", "n_nodes": 0}, "n_nodes must be at least 1"),
        ({"compute": "c", "n_nodes": 10**9}, "n_nodes must be at most 4000"),
        ({"compute": "c", "processes_per_node": -1}, "processes_per_node"),
        ({"compute": "c", "job_timeout": "soon"}, "Invalid job_timeout"),
        ({"compute": "c", "startup_timeout": "-5"}, "Invalid startup_timeout"),
        ({"compute": "c", "name": "has space"}, "name must match"),
        ({"compute": "c", "experiment_name": "bad/name"}, "experiment_name must match"),
        ({"compute": "c", "connect": "telepathy"}, "connect must be one of"),
        ({"compute": "c", "distribution": "horovod"}, "distribution must be one of"),
        ({"compute": "c", "tags": ["x"]}, "tags must be a mapping"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        resolve_settings(**kwargs)


def test_unknown_setting_names_the_closest():
    with pytest.raises(
        ConfigurationError, match=r"Unknown setting 'n_node'\. Did you mean 'n_nodes'"
    ):
        resolve_settings(compute="c", n_node=1)


def test_default_name_is_a_valid_aml_name():
    s = resolve_settings(compute="c")
    assert s.name.startswith("dask-")
    assert resolve_settings(compute="c").name != s.name
