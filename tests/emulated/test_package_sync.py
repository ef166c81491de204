"""stack="sync" (the default) on the strict emulator: the nodes' environment is built from the
package index with the client's distributions, a local editable project reaches the nodes in the
code snapshot, a local compiled one is refused before anything is submitted, and the synced
requirements resolve with pip from the package index (network: the index, as the builds)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
from _helpers import fake_distribution
from distributed import Client

from dask_amlcompute import AmlComputeCluster, ConfigurationError
from dask_amlcompute.cli import main as cli_main


@pytest.fixture
def editable_project(tmp_path, monkeypatch):
    """A pure-Python project installed editable (as ``pip install -e`` leaves it) in a site
    folder on sys.path: its dist-info records the project folder (PEP 610), a .pth its source."""
    source = tmp_path / "project" / "src"
    (source / "sync_tool").mkdir(parents=True)
    (source / "sync_tool" / "__init__.py").write_text("def double(x):\n    return 2 * x\n")
    site = tmp_path / "site"
    fake_distribution(
        site, "sync-tool", "0.3", direct_url=str(tmp_path / "project"),
        files={"__editable__.sync_tool-0.3.pth": f"{source}\n"},
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(source))  # what site.py does with the .pth
    return source


@pytest.mark.slow
def test_the_clients_packages_and_a_local_project_reach_the_nodes(
    ml_client, cluster_kwargs, editable_project
):
    import sklearn

    def on_node() -> dict:  # nested: pickled by value
        import importlib.metadata

        import sklearn
        import sync_tool
        from sklearn.linear_model import LinearRegression

        fit = LinearRegression().fit([[0.0], [1.0], [2.0]], [1.0, 3.0, 5.0])
        return {
            "sklearn": sklearn.__version__,
            "slope": round(float(fit.coef_[0]), 6),
            "double": sync_tool.double(21),
            "version": importlib.metadata.version("sync-tool"),
            "from": sync_tool.__file__,
        }

    # no pip_packages: scikit-learn is installed here, so the nodes get it at this version
    kwargs = {**cluster_kwargs, "stack": "sync"}
    with AmlComputeCluster(ml_client, n_nodes=1, **kwargs) as cluster, Client(cluster) as client:
        facts = client.submit(on_node, pure=False).result(timeout=60)
    assert facts["sklearn"] == sklearn.__version__ and facts["slope"] == 2.0
    assert facts["double"] == 42 and facts["version"] == "0.3"
    assert str(editable_project) not in facts["from"]  # the snapshot's copy, not the client's


def test_a_local_compiled_distribution_is_refused_before_submitting(
    ml_client, cluster_kwargs, tmp_path, monkeypatch
):
    site = tmp_path / "site"
    fake_distribution(
        site, "sync-native", "0.1", direct_url=str(tmp_path),
        files={"sync_native/__init__.py": "", "sync_native/_core.abi3.so": ""},
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    before = len(list(ml_client.jobs.list()))
    with pytest.raises(ConfigurationError, match=r"sync-native 0.1.*pip_packages=.*environment="):
        AmlComputeCluster(ml_client, n_nodes=1, **{**cluster_kwargs, "stack": "sync"})
    assert len(list(ml_client.jobs.list())) == before  # nothing was submitted


@pytest.mark.slow
def test_the_synced_requirements_resolve_from_the_package_index(tmp_path):
    """What AML's image build does first: pip resolves `dask-amlcompute env --format pip`."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["env", "--format", "pip"]) == 0
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(out.getvalue())
    assert len(out.getvalue().splitlines()) > 20  # this test venv's packages, not a short list
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    done = subprocess.run(
        [*pip, "--report", str(report), "-r", str(requirements)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(report.read_text())["install"]) >= len(out.getvalue().splitlines()) - 1
