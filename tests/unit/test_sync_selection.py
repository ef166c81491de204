"""stack="sync": which of the client's distributions the nodes get, which travel in the code
snapshot and which are refused (fabricated .dist-info folders on sys.path, no network)."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stdout

import pytest
from _helpers import fake_distribution

from dask_amlcompute import ConfigurationError
from dask_amlcompute.backend.environment import (
    CLIENT_ONLY,
    build_spec,
    local_packages,
    pinned_packages,
)
from dask_amlcompute.backend.snapshot import stage_snapshot
from dask_amlcompute.cli import main as cli_main


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site folder first on sys.path (restored afterwards), as a virtualenv's would be."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_installed_distributions_are_pinned_but_client_only_tools_and_what_only_they_need(site):
    fake_distribution(
        site, "sync-app", "1.0", requires=("sync-helper>=2", "sync-extra; extra == 'x'")
    )
    fake_distribution(site, "sync-helper", "2.5")
    fake_distribution(site, "sync-extra", "0.1")  # nothing needs it unconditionally: a root
    fake_distribution(site, "pytest-sync-plugin", "3.0", requires=("sync-kernel-only",))
    fake_distribution(site, "sync-kernel-only", "4.0")  # only a client-only tool needs it
    fake_distribution(site, "sync-shared", "5.0")
    fake_distribution(site, "ipykernel", "99.0", requires=("sync-shared",))
    fake_distribution(site, "sync-user", "1.0", requires=("sync-shared",))
    pins = pinned_packages("sync")
    assert (
        pins["sync-app"] == "1.0" and pins["sync-helper"] == "2.5" and pins["sync-extra"] == "0.1"
    )
    assert pins["sync-shared"] == "5.0"  # a kept distribution needs it too
    assert "pytest-sync-plugin" not in pins and "sync-kernel-only" not in pins
    assert "ipykernel" not in pins and not set(pins) & CLIENT_ONLY
    assert "dask-amlcompute" not in pins  # travels in the snapshot
    for stack in ("installed", "imported", "none"):
        assert "sync-app" not in pinned_packages(stack)
    spec = build_spec()
    assert "sync-app==1.0" in spec.pip and list(spec.pins) == sorted(spec.pins)
    assert build_spec().content_hash == spec.content_hash  # stable: AML reuses the image


def test_a_local_pure_python_distribution_travels_in_the_snapshot(site, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    fake_distribution(
        site, "sync-local", "0.3.dev1", direct_url=str(project),
        files={"sync_local/__init__.py": "ANSWER = 42\n", "sync_local/sub/mod.py": "X = 1\n"},
    )  # fmt: skip
    assert "sync-local" not in pinned_packages("sync")
    assert not any(p.startswith("sync-local") for p in build_spec().pip)
    files = dict(local_packages("sync"))
    assert {"sync_local/__init__.py", "sync_local/sub/mod.py"} <= set(files)
    assert "sync_local-0.3.dev1.dist-info/METADATA" in files  # importlib.metadata finds it there
    assert (
        local_packages("installed") == []
        and local_packages("sync", ["sync-local @ https://x/w.whl"]) == []
    )
    staged = stage_snapshot(packages=local_packages("sync"), root=tmp_path / "snapshots")
    assert (staged / "sync_local" / "__init__.py").read_text() == "ANSWER = 42\n"
    assert (staged / "dask_amlcompute" / "__init__.py").is_file()


def test_a_snapshot_over_amls_limit_is_refused_before_anything_is_staged(site, tmp_path):
    fake_distribution(
        site, "sync-big", "1.0", direct_url=str(tmp_path), files={"sync_big/__init__.py": ""}
    )
    with open(site / "sync_big" / "weights.bin", "wb") as big:  # sparse: no disk used
        big.truncate(301 * 2**20)
    with pytest.raises(
        ConfigurationError,
        match=r"over AML's limit of 300\.00 MiB\. Largest: sync_big/ \(301\.00 MiB",
    ):
        stage_snapshot(packages=local_packages("sync"), root=tmp_path / "snapshots")
    assert not (tmp_path / "snapshots").exists()


def test_an_editable_install_travels_from_its_source_folder(site, tmp_path):
    source = tmp_path / "project" / "src"
    (source / "sync_editable").mkdir(parents=True)
    (source / "sync_editable" / "__init__.py").write_text("VALUE = 'edited'\n")
    (source / "conftest.py").write_text("")  # beside the package, not part of it
    fake_distribution(
        site, "sync-editable", "1.0", direct_url=str(tmp_path / "project"),
        files={"__editable__.sync_editable-1.0.pth": f"{source}\n"},
    )  # fmt: skip
    sys.path.append(str(source))  # what site.py does with the .pth (restored by syspath_prepend)
    files = dict(local_packages("sync"))
    assert files["sync_editable/__init__.py"] == source / "sync_editable" / "__init__.py"
    assert "conftest.py" not in files


def test_a_local_compiled_distribution_is_refused_with_the_ways_out(site, tmp_path):
    fake_distribution(
        site, "sync-compiled", "0.1", direct_url=str(tmp_path),
        files={"sync_compiled/__init__.py": "", "sync_compiled/_ext.cpython-311-x86_64-linux-gnu.so": ""},
    )  # fmt: skip
    with pytest.raises(ConfigurationError) as err:
        build_spec()
    message = str(err.value)
    assert "sync-compiled 0.1" in message and "_ext.cpython" in message
    for way_out in ("pip_packages=", "environment=", "stack='installed'"):
        assert way_out in message
    # a local version label (PEP 440: no public index takes one) is a local build too
    fake_distribution(site, "sync-wheel", "2.0+cpu", files={"sync_wheel/_c.so": ""})
    with pytest.raises(ConfigurationError, match=r"sync-wheel 2\.0\+cpu is installed from a local"):
        build_spec(extra_pip=["sync-compiled @ https://example.org/w.whl"])
    assert "sync-wheel" not in pinned_packages("sync")
    # a requirement that installs it is the way out; so is a lighter stack
    extra_pip = ["sync-compiled @ https://example.org/w.whl", "sync-wheel==2.0"]
    assert "sync-wheel==2.0" in build_spec(extra_pip=extra_pip).pip
    assert build_spec(stack="installed")


def test_a_user_requirement_of_a_synced_distribution(site):
    fake_distribution(site, "sync-app", "1.0")
    assert "sync-app==1.0" in build_spec(extra_pip=["sync-app"]).pip  # satisfied: pin kept
    assert "sync-app==1.0" in build_spec(extra_pip=["sync-app>=0.5"]).pip
    spec = build_spec(extra_pip=["sync-app==0.9"])  # the user's pin wins
    assert "sync-app==0.9" in spec.pip and "sync-app==1.0" not in spec.pip
    with pytest.raises(ConfigurationError, match="dask"):
        build_spec(extra_pip=["dask<2020"])  # the shared versions stay an error


def test_the_env_command_prints_the_synced_requirements(site):
    fake_distribution(site, "sync-app", "1.0")
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["env", "--format", "pip"]) == 0
    assert "sync-app==1.0" in out.getvalue().splitlines()
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["env", "--format", "pip", "--stack", "installed"]) == 0
    assert "sync-app==1.0" not in out.getvalue()


def test_client_only_list_names_real_tools():
    assert {"pip", "pytest", "ipykernel", "azure-ai-ml", "aml-emulator", "mypy"} <= CLIENT_ONLY
