"""The default node environment: pins, merging of user packages, hashes (no network)."""

from __future__ import annotations

import dataclasses
import json
import sys

import cloudpickle
import dask
import distributed
import pytest
import yaml

from dask_amlcompute import ConfigurationError, __version__
from dask_amlcompute.backend.environment import (
    DEFAULT_IMAGE,
    build_spec,
    environment_from_settings,
    library_in_snapshot,
    local_python,
    local_version,
)
from dask_amlcompute.cli import main as cli_main
from dask_amlcompute.config import resolve_settings


def pip_of(spec):
    return list(spec.conda_dict()["dependencies"][-1]["pip"])


def test_generated_spec_pins_the_client_versions():
    spec = build_spec()
    deps = spec.conda_dict()["dependencies"]
    assert (
        deps[0]
        == f"python={sys.version_info[0]}.{sys.version_info[1]}"
        == f"python={local_python()}"
    )
    pip = pip_of(spec)
    for line in (
        f"dask=={dask.__version__}",
        f"distributed=={distributed.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
    ):
        assert line in pip
    # no index has the library: it travels in the code snapshot, never as a requirement
    assert not [p for p in pip if p.startswith("dask-amlcompute")]
    assert spec.library is None
    # the node helpers: pinned when the client has them (sync), else unpinned
    assert {p.split("==")[0] for p in pip} >= {"mlflow-skinny", "azureml-mlflow"}
    # the installed data stack is pinned by default, imported or not (dataframe work needs it)
    for name in ("numpy", "pandas", "pyarrow"):
        if local_version(name):
            assert f"{name}=={local_version(name)}" in pip
    assert spec.image == DEFAULT_IMAGE


def test_scientific_stack_follows_what_is_imported_or_installed():
    imported = {n for n in ("numpy", "pandas", "pyarrow") if n in sys.modules}
    assert set(build_spec(stack="imported").pins) & {"numpy", "pandas", "pyarrow"} == {
        n for n in imported if local_version(n)
    }
    installed = {n for n in ("numpy", "pandas", "pyarrow") if local_version(n)}
    assert set(build_spec(stack="installed").pins) >= installed
    assert not set(build_spec(stack="none").pins) & {"numpy", "pandas", "pyarrow"}


def test_hash_is_stable_and_changes_when_a_pin_changes():
    a, b = build_spec(stack="none"), build_spec(stack="none")
    assert a.content_hash == b.content_hash and len(a.content_hash) == 16
    assert a.aml_version == b.aml_version == a.to_environment().version
    assert a.to_environment().name == "CliV2AnonymousEnvironment"
    # the same pins in another order hash the same (extras are sorted)
    assert (
        build_spec(extra_pip=["b-pkg", "a-pkg"]).content_hash
        == build_spec(extra_pip=["a-pkg", "b-pkg"]).content_hash
    )
    bumped = dataclasses.replace(
        a, pip=tuple(p.replace(f"dask=={dask.__version__}", "dask==2000.1.0") for p in a.pip)
    )
    assert bumped.pip != a.pip
    assert bumped.content_hash != a.content_hash
    assert bumped.aml_version != a.aml_version
    assert build_spec(image="python:3.11-slim").content_hash != a.content_hash


def test_hash_changes_when_the_local_version_changes(monkeypatch):
    before = build_spec(stack="none")
    monkeypatch.setattr(cloudpickle, "__version__", "0.0.1")
    after = build_spec(stack="none")
    assert "cloudpickle==0.0.1" in after.pip
    assert after.content_hash != before.content_hash
    assert after.aml_version != before.aml_version


def test_user_extras_merge_with_the_pins():
    spec = build_spec(
        stack="installed",
        extra_pip=[
            "scikit-learn>=1.3",
            "dask[dataframe]",
            f"distributed>={distributed.__version__}",
        ],
        extra_conda=["gcc", f"python={local_python()}"],
    )
    pip = pip_of(spec)
    assert f"dask[dataframe]=={dask.__version__}" in pip  # extras kept, pin kept
    assert f"distributed=={distributed.__version__}" in pip  # compatible spec: pin kept
    assert not any(p.startswith("distributed>=") for p in pip)
    assert "scikit-learn>=1.3" in pip
    assert "gcc" in spec.conda_dict()["dependencies"]
    assert sum(d == f"python={local_python()}" for d in spec.conda_dict()["dependencies"]) == 1


def test_unversioned_scientific_extra_is_pinned_to_the_local_version():
    import pandas  # noqa: F401

    spec = build_spec(stack="none", extra_pip=["pandas"])
    assert f"pandas=={local_version('pandas')}" in spec.pip
    assert "pandas" not in spec.pip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"extra_pip": ["dask==2000.1.0"]}, "client runs dask"),
        ({"extra_pip": ["cloudpickle<1"]}, "client runs cloudpickle"),
        ({"extra_conda": ["python=3.6"]}, "client runs python"),
        ({"extra_conda": ["distributed==2000.1.0"]}, "client runs distributed"),
        ({"extra_pip": ["dask-amlcompute==0.0.1"], "node_package": "x"}, "once"),
    ],
)
def test_conflicting_user_pins_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        build_spec(**kwargs)


def test_a_user_scientific_pin_replaces_the_automatic_one():
    import numpy  # noqa: F401

    spec = build_spec(stack="installed", extra_pip=["numpy<1"])
    assert "numpy<1" in spec.pip
    assert "numpy" not in spec.pins
    # the same under sync: the user's requirement replaces the synced pin
    synced = build_spec(extra_pip=["scikit-learn<1"])
    assert "scikit-learn<1" in synced.pip and "scikit-learn" not in synced.pins


def test_node_package_overrides_the_snapshot():
    url = "dask-amlcompute @ https://example.org/dask_amlcompute-0.1.0-py3-none-any.whl"
    assert library_in_snapshot(None, None) and library_in_snapshot("", ["numpy"])
    assert not library_in_snapshot(url, None)
    assert not library_in_snapshot(None, ["dask-amlcompute==0.1.0"])
    spec = build_spec(node_package=url)
    assert url in spec.pip and f"dask-amlcompute=={__version__}" not in spec.pip
    assert build_spec(extra_pip=[url]).library == url
    assert "code snapshot" in build_spec().dockerfile()  # where the library comes from
    assert "--node-package" not in spec.dockerfile()


def test_renderings_carry_the_same_pins():
    spec = build_spec(extra_pip=["scikit-learn"])
    assert yaml.safe_load(spec.conda_yaml()) == spec.conda_dict()
    reqs = spec.requirements().splitlines()
    assert reqs[0].endswith(f"Python {local_python()}") and reqs[1:] == list(spec.pip)
    docker = spec.dockerfile()
    assert f"FROM {DEFAULT_IMAGE}" in docker and f'"python={local_python()}"' in docker
    assert all(f'"{p}"' in docker for p in spec.pip)


def resolve_environment(environment, pip_packages=()):
    settings = resolve_settings(compute="c", environment=environment, pip_packages=pip_packages)
    return environment_from_settings(settings)


def test_user_environments_are_unchanged():
    from azure.ai.ml.entities import Environment

    env = Environment(name="mine", version="3", image="x/y:1")
    assert resolve_environment(env) is env
    assert resolve_environment("my-env@latest") == "my-env@latest"
    assert resolve_environment("my-env:4") == "my-env:4"
    assert resolve_environment("azureml:my-env:4") == "azureml:my-env:4"
    image = resolve_environment("myregistry.azurecr.io/dask:1")
    assert image.image == "myregistry.azurecr.io/dask:1" and not image.conda_file
    with pytest.raises(ConfigurationError, match="default environment only"):
        resolve_environment("my-env@latest", ["scikit-learn"])


def test_settings_feed_the_default_environment():
    s = resolve_settings(compute="c", pip_packages=["rich"], node_package="git+https://x/y")
    env = environment_from_settings(s)
    pip = env.conda_file["dependencies"][-1]["pip"]
    assert "rich" in pip and "git+https://x/y" in pip
    assert s.stack == "sync" and resolve_settings(compute="c", stack="none").stack == "none"
    assert resolve_settings(compute="c").version_check == "raise"


@pytest.fixture
def keep_signal_handlers():
    """The CLI entry point may install process-wide signal handlers: put ours back."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_cli_prints_the_spec(capsys, keep_signal_handlers):
    assert cli_main(["env"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert f"dask=={dask.__version__}" in info["conda"]["dependencies"][-1]["pip"]
    assert info["aml_environment"].startswith("CliV2AnonymousEnvironment:")
    assert cli_main(["env", "--format", "pip", "--extra", "scikit-learn"]) == 0
    out = capsys.readouterr().out
    assert f"distributed=={distributed.__version__}" in out and "scikit-learn" in out
    assert cli_main(["env", "--format", "dockerfile", "--node-package", "/src"]) == 0
    assert '"/src"' in capsys.readouterr().out
    assert cli_main(["env", "--format", "conda", "--extra", "dask==2000.1.0"]) == 2
    assert "client runs dask" in capsys.readouterr().err
