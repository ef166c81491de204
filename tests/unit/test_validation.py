"""Durations, names and mappings (no network)."""

from __future__ import annotations

import pytest

from dask_amlcompute import ConfigurationError
from dask_amlcompute.config import checked, resolve_settings
from dask_amlcompute.validation import parse_duration


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
    assert checked("experiment-name", "dask-user_1") == "dask-user_1"
    for bad in ["", "-x", "a b", "x" * 256, "a/b", "abc\n", "abc\x00"]:
        with pytest.raises(ConfigurationError, match="experiment_name"):
            checked("experiment-name", bad)
    checked("name", "x" * 200)  # room for '-w<n>-<series>' and the 'dask_cluster.' tag key
    with pytest.raises(ConfigurationError, match="at most 200"):
        checked("name", "x" * 201)


def test_durations_are_bounded():
    assert parse_duration("2h", "job_timeout", 1, 86400) == 7200.0
    for bad in (float("inf"), "1e400s", 1e-9, 10**12):
        with pytest.raises(ConfigurationError, match="job_timeout"):
            checked("job-timeout", bad)
    with pytest.raises(ConfigurationError, match="poll_interval"):
        checked("poll-interval", "1ms")


# -- helpers of resolve_settings (issue #13) ------------------------------------------

from dask_amlcompute.validation import (  # noqa: E402
    EnvironmentRef,
    environment_reference,
    environment_setting,
    memory_limit,
)


@pytest.mark.parametrize(
    "value", ["auto", None, "4GiB", "500 MB", "1e9", 8 * 2**30, 0.5, 1, "0.25", 0, "0", 2.5e9]
)
def test_memory_limit_accepts_what_distributed_accepts(value):
    assert memory_limit(value) == value


@pytest.mark.parametrize(
    "value",
    ["lots", "", "AUTO", "-1GB", -1, -0.5, True, float("inf"), 100, "512kB", [1], 10**30, "1e400"],
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
    assert checked("env-vars", {"_A1": "x", "B": "", "PEM": "a\nb"}) == {
        "_A1": "x",
        "B": "",
        "PEM": "a\nb",
    }
    assert checked("env-vars", None) == {}
    for bad, match in [
        ({"BAD NAME": "1"}, "BAD NAME"),
        ({"A=B": "1"}, "A=B"),
        ({"9A": "1"}, "9A"),
        ({"FOO\n": "1"}, "FOO"),
        ({"": "1"}, "''"),
        ({1: "1"}, "1"),
        ({"A": 1}, "must be a string"),
        ({"A": None}, "must be a string"),
        ({"A": "a\x00b"}, "control"),
        ("A=1", "mapping"),
        ({"AZUREML_RUN_ID": "x"}, "AZUREML_RUN_ID"),
        ({"MASTER_ADDR": "x"}, "MASTER_ADDR"),
        ({"DASK_AMLCOMPUTE_TLS_CERT": "x"}, "DASK_AMLCOMPUTE_TLS_CERT"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            checked("env-vars", bad)


def test_tags_are_refused_instead_of_converted():
    assert checked("tags", {"team": "data"}) == {"team": "data"}
    assert checked("tags", None) == {}  # as for env_vars: None is no tags
    for bad, match in [
        ({"a": 1}, r"tags\['a'\] must be a string"),
        ({("a",): "x"}, "string"),
        ({"a": "x\ny"}, "control"),
        ({"a": "x" * 200_000}, "at most 8000"),
        ({f"k{i}": "v" for i in range(51)}, "at most 50"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            checked("tags", bad)


def test_booleans_and_ports_are_strict():
    assert checked("quiet", True) is True
    for bad in ("no", "false", 0, 1, None):
        with pytest.raises(ConfigurationError, match="quiet must be True or False"):
            checked("quiet", bad)
    assert checked("scheduler-port", 0) == 0 and checked("scheduler-port", 65535) == 65535
    for bad in (-1, 65536, True, "8786", 8786.0):
        with pytest.raises(ConfigurationError, match="scheduler_port"):
            checked("scheduler-port", bad)


def test_package_lists():
    assert checked("conda-packages", None) is None
    assert checked("conda-packages", ("gcc", "make")) == ["gcc", "make"]
    for bad in ("gcc", ["gcc", ""], [None], {"gcc": 1}, ["a\nb"]):
        with pytest.raises(ConfigurationError, match="conda_packages"):
            checked("conda-packages", bad)
    ok = [
        "scikit-learn>=1.3",
        "dask[dataframe]",
        "pkg @ https://example.org/pkg-1.0-py3-none-any.whl",
        "git+https://github.com/org/repo@v1",
        "https://example.org/pkg-1.0-py3-none-any.whl",
        "./local/pkg",
        "--extra-index-url https://pkgs.example.org/simple",
    ]
    assert checked("pip-packages", ok) == ok
    for bad in (["numpy>>1"], ["not a requirement"], ["pkg=="], "numpy"):
        with pytest.raises(ConfigurationError, match="pip_packages"):
            checked("pip-packages", bad)


def test_existing_file(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("key")
    assert checked("ssh-key", str(key)) == str(key)
    assert checked("ssh-key", key) == str(key)  # os.PathLike too
    assert checked("ssh-key", None) is None
    for bad in (str(tmp_path / "missing"), str(tmp_path), "", 3):
        with pytest.raises(ConfigurationError, match="ssh_key"):
            checked("ssh-key", bad)


def test_options_travel_as_json():
    assert checked("worker-options", {"resources": {"GPU": 1}}) == {"resources": {"GPU": 1}}
    assert checked("worker-options", None) == {}
    for bad, match in [
        (["x"], "mapping"),
        ({1: 2}, "string"),
        ({"not an identifier": 1}, "must match"),
        ({"f": print}, "JSON"),
        ({"x": float("nan")}, "JSON"),
        ({"x": {"y": [1, object()]}}, r"worker_options\['x'\]\['y'\]\[1\].*JSON"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            checked("worker-options", bad)


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

    from dask_amlcompute.backend.environment import environment_from_settings

    env = Environment(image="docker.io/library/python:3.11")
    assert environment_setting(env) is env
    assert checked("environment", env) is env  # an entity: the backend checks it
    for bad in (42, ["my-env:1"]):
        with pytest.raises(ConfigurationError, match="environment"):
            environment_from_settings(resolve_settings(compute="c", environment=bad))
    assert environment_setting(None) is None
    assert environment_setting("docker.io/library/python:3.11") == "docker.io/library/python:3.11"
    assert environment_setting("azureml:my-env@latest") == "my-env@latest"
    assert environment_setting("azureml:my-env:2") == "azureml:my-env:2"
    for bad in ("", " my-env:1", "my env:1", "my-env:1\n"):
        with pytest.raises(ConfigurationError, match="environment"):
            checked("environment", bad)
