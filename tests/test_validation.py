"""Durations, names and mappings (no network)."""

from __future__ import annotations

import pytest

from dask_amlcompute import ConfigurationError
from dask_amlcompute.validation import aml_name, parse_duration


@pytest.mark.parametrize(
    "value, seconds",
    [
        (60, 60.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1.5 hours", 5400.0),
        ("PT1H30M", 5400.0),
        ("PT1H", 3600.0),
        ("PT45S", 45.0),
        ("PT1H1M1S", 3661.0),
        ("pt45s", 45.0),
        ("P1DT1H", 90000.0),
        ("P1W", 604800.0),
        ("PT0.5S", 0.5),
        ("1:30:00", 5400.0),
        ("05:00", 300.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "soon", "PT", "P", "-5", 0, -1, "1:xx", True, [1], "P1M", "-PT5S", "nan"]
)
def test_bad_durations_raise(value):
    with pytest.raises(ConfigurationError, match="Invalid job_timeout"):
        parse_duration(value, "job_timeout")


def test_none_passes_through():
    assert parse_duration(None) is None


def test_aml_names():
    assert aml_name("dask-user_1", "name") == "dask-user_1"
    for bad in ["", "-x", "a b", "x" * 256, "a/b"]:
        with pytest.raises(ConfigurationError):
            aml_name(bad, "name")


# -- helpers of resolve_settings (issue #13) ------------------------------------------

from dask_amlcompute.validation import (  # noqa: E402
    EnvironmentRef,
    boolean,
    env_var_mapping,
    environment_reference,
    environment_setting,
    existing_file,
    memory_limit,
    options_mapping,
    pip_requirements,
    port,
    string_list,
    string_mapping,
)


@pytest.mark.parametrize(
    "value", ["auto", None, "4GiB", "500 MB", "1e9", 8 * 2**30, 0.5, 1, "0.25", 0, "0", 2.5e9]
)
def test_memory_limit_accepts_what_distributed_accepts(value):
    assert memory_limit(value) == value


@pytest.mark.parametrize(
    "value", ["lots", "", "AUTO", "-1GB", -1, -0.5, True, float("inf"), 100, "512kB", [1]]
)
def test_memory_limit_refuses(value):
    with pytest.raises(ConfigurationError, match="memory_limit"):
        memory_limit(value)


def test_memory_limit_fractions_and_sizes_match_distributed():
    # distributed.worker_memory.parse_memory_limit: a number <= 1 is a fraction, more is bytes
    import logging

    from distributed.worker_memory import parse_memory_limit

    for value in ("4GiB", 0.5, "0.25", 1, 2**30):
        assert memory_limit(value) == value
        assert parse_memory_limit(value, 1, 1, logger=logging.getLogger("test")) > 2**20


def test_env_vars_need_portable_names_and_string_values():
    assert env_var_mapping({"_A1": "x", "B": ""}) == {"_A1": "x", "B": ""}
    assert env_var_mapping(None) == {}
    for bad, match in [
        ({"BAD NAME": "1"}, "BAD NAME"),
        ({"A=B": "1"}, "A=B"),
        ({"9A": "1"}, "9A"),
        ({"": "1"}, "''"),
        ({1: "1"}, "1"),
        ({"A": 1}, "must be a string"),
        ({"A": None}, "must be a string"),
        ("A=1", "mapping"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            env_var_mapping(bad)


def test_string_mapping_refuses_instead_of_converting():
    assert string_mapping({"team": "data"}, "tags") == {"team": "data"}
    with pytest.raises(ConfigurationError, match=r"tags\['a'\] must be a string"):
        string_mapping({"a": 1}, "tags")
    with pytest.raises(ConfigurationError, match="non-empty strings"):
        string_mapping({("a",): "x"}, "tags")


def test_booleans_and_ports_are_strict():
    assert boolean(True, "quiet") is True
    for bad in ("no", "false", 0, 1, None):
        with pytest.raises(ConfigurationError, match="quiet must be True or False"):
            boolean(bad, "quiet")
    assert port(0, "scheduler_port") == 0 and port(65535, "scheduler_port") == 65535
    for bad in (-1, 65536, True, "8786", 8786.0):
        with pytest.raises(ConfigurationError, match="scheduler_port"):
            port(bad, "scheduler_port")


def test_package_lists():
    assert string_list(None, "conda_packages") == []
    assert string_list(("gcc", "make"), "conda_packages") == ["gcc", "make"]
    for bad in ("gcc", ["gcc", ""], ["  "], [None], {"gcc": 1}):
        with pytest.raises(ConfigurationError, match="conda_packages"):
            string_list(bad, "conda_packages")
    ok = [
        "scikit-learn>=1.3",
        "dask[dataframe]",
        "pkg @ https://example.org/pkg-1.0-py3-none-any.whl",
        "git+https://github.com/org/repo@v1",
        "https://example.org/pkg-1.0-py3-none-any.whl",
        "./local/pkg",
        "--extra-index-url https://pkgs.example.org/simple",
    ]
    assert pip_requirements(ok) == ok
    for bad in (["numpy>>1"], ["not a requirement"], ["pkg=="], "numpy"):
        with pytest.raises(ConfigurationError, match="pip_packages"):
            pip_requirements(bad)


def test_existing_file(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("key")
    assert existing_file(str(key), "ssh_key") == str(key)
    assert existing_file(key, "ssh_key") == str(key)  # os.PathLike too
    assert existing_file(None, "ssh_key") is None
    for bad in (str(tmp_path / "missing"), str(tmp_path), "", 3):
        with pytest.raises(ConfigurationError, match="ssh_key"):
            existing_file(bad, "ssh_key")


def test_options_travel_as_json():
    assert options_mapping({"resources": {"GPU": 1}}, "worker_options") == {"resources": {"GPU": 1}}
    assert options_mapping(None, "worker_options") == {}
    for bad, match in [
        (["x"], "dict of keyword arguments"),
        ({1: 2}, "keyword argument names"),
        ({"not an identifier": 1}, "keyword argument names"),
        ({"f": print}, "JSON"),
        ({"x": float("nan")}, "JSON"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            options_mapping(bad, "worker_options")


@pytest.mark.parametrize(
    "text, ref",
    [
        ("my-env@latest", EnvironmentRef("my-env", label="latest")),
        ("my-env:3", EnvironmentRef("my-env", "3")),
        ("azureml:my-env:3", EnvironmentRef("my-env", "3")),
        ("azureml:my-env@latest", EnvironmentRef("my-env", label="latest")),
        ("my_env.v2:1.0", EnvironmentRef("my_env.v2", "1.0")),
        ("python:3.11", EnvironmentRef("python", "3.11")),  # a registered env, not an image
        ("myacr.azurecr.io/dask:1", None),
        ("azureml://registries/azureml/environments/x/versions/1", None),
        ("AzureML-sklearn-1.5", None),
        ("azureml:AzureML-sklearn-1.5@latest", None),
    ],
)
def test_environment_reference(text, ref):
    assert environment_reference(text) == ref


@pytest.mark.parametrize(
    "text, match",
    [
        ("my-env", "names no version"),
        ("azureml:my-env", "names no version"),
        ("my-env@prod", "only the label 'latest'"),
        ("my-env:", "not an environment reference"),
        ("@latest", "not an environment reference"),
        ("my$env:1", "not an environment reference"),
    ],
)
def test_bad_environment_references(text, match):
    with pytest.raises(ConfigurationError, match=match):
        environment_reference(text)


def test_environment_setting():
    from azure.ai.ml.entities import Environment

    env = Environment(image="docker.io/library/python:3.11")
    assert environment_setting(env) is env
    assert environment_setting(None) is None
    assert environment_setting("docker.io/library/python:3.11") == "docker.io/library/python:3.11"
    assert environment_setting("azureml:my-env@latest") == "my-env@latest"
    assert environment_setting("azureml:my-env:2") == "azureml:my-env:2"
    for bad in ("", " my-env:1", "my env:1", 42, ["my-env:1"]):
        with pytest.raises(ConfigurationError, match="environment"):
            environment_setting(bad)
