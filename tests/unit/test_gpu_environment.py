"""The GPU sizes' default environment: a dask-cuda that runs the client's dask, or a refusal.

Two tests read the package index (pypi.org, as AML's image build does): one resolves the GPU
environment the library would submit with pip's real resolver (``pip install --dry-run``), one
checks the shipped dask-cuda table against the index's metadata.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _helpers import GPU_DASK as SUPPORTED
from _helpers import NO_GPU_DASK as UNSUPPORTED
from packaging.requirements import Requirement
from packaging.version import Version

from dask_amlcompute.backend.daskcuda import (
    CUDA_IMAGE,
    FIRST_WITH_CUDA_EXTRAS,
    RELEASES,
    dask_cuda_requirement,
)
from dask_amlcompute.backend.environment import build_spec, local_python
from dask_amlcompute.cli import main as cli_main
from dask_amlcompute.exceptions import ConfigurationError


def test_gpu_environment_pins_the_dask_cuda_of_the_clients_dask(client_dask):
    client_dask("2025.9.1")
    spec = build_spec(gpu=True, stack="none")
    assert "dask-cuda[cu12]==25.12.0" in spec.pip and "dask==2025.9.1" in spec.pip
    assert spec.image == CUDA_IMAGE
    assert "openssh-server" in spec.dockerfile()  # AML's job SSH service needs it
    assert "openssh-server" not in build_spec(stack="none").dockerfile()
    assert build_spec(gpu=True, stack="none", image="my/image:1").image == "my/image:1"
    # before the cu12 extra existed: the plain package
    assert dask_cuda_requirement("2025.7.0", "3.10") == "dask-cuda==25.8.0"


def test_a_dask_without_dask_cuda_is_refused_naming_the_way_out(client_dask):
    client_dask(UNSUPPORTED)
    with pytest.raises(ConfigurationError) as info:
        build_spec(gpu=True)
    message = str(info.value)
    assert f"dask {UNSUPPORTED}" in message and SUPPORTED in message
    assert "gpu_workers='none'" in message and "Nothing was submitted" in message
    # a Python no release supports yet has none at all
    with pytest.raises(ConfigurationError, match="No dask-cuda release"):
        dask_cuda_requirement(SUPPORTED, "3.9")


def test_cli_prints_the_gpu_environment(client_dask, capsys):
    import signal

    saved = signal.getsignal(signal.SIGTERM)  # the CLI turns SIGTERM into KeyboardInterrupt
    try:
        _cli_gpu(client_dask, capsys)
    finally:
        signal.signal(signal.SIGTERM, saved)


def _cli_gpu(client_dask, capsys):
    client_dask(SUPPORTED)
    for fmt in ("json", "conda", "pip", "dockerfile"):
        assert cli_main(["env", "--gpu", "--format", fmt]) == 0
        assert "dask-cuda" in capsys.readouterr().out
    client_dask(UNSUPPORTED)
    assert cli_main(["env", "--gpu"]) == 2
    assert "gpu_workers='none'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_environment_resolves_against_the_index(client_dask, tmp_path):
    client_dask(SUPPORTED)
    spec = build_spec(gpu=True)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(spec.requirements())
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "--report", str(report), "-r", str(reqs)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    installed = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert installed["dask"] == installed["distributed"] == SUPPORTED
    want = Requirement(dask_cuda_requirement(SUPPORTED, local_python()))
    assert want.specifier.contains(installed["dask-cuda"])


def _index_versions(name: str) -> list[Version]:
    request = urllib.request.Request(
        f"https://pypi.org/simple/{name}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:  # PEP 691
        versions = json.load(answer)["versions"]
    return sorted(v for v in map(Version, versions) if not v.is_prerelease)


def _requires(name: str, version: Version, folder: Path) -> tuple[str, list[Requirement]]:
    """Requires-Python and Requires-Dist of a release's wheel (pip download, no dependencies)."""
    folder = folder / f"{name}-{version}"  # a folder per download: several run at once
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
         "--python-version", "3.11", "-d", str(folder), f"{name}=={version}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    wheel = next(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    lines = meta.decode().splitlines()
    python = next((ln.split(": ", 1)[1] for ln in lines if ln.startswith("Requires-Python:")), "")
    return python, [
        Requirement(ln.split(": ", 1)[1]) for ln in lines if ln.startswith("Requires-Dist:")
    ]


def _pinned_dask(reqs: list[Requirement]) -> str:
    """The one dask version a rapids-dask-dependency release allows (== or >=X,<X+1 patch)."""
    spec = next(r.specifier for r in reqs if r.name == "dask" and not r.marker)
    assert str(spec) == str(next(r.specifier for r in reqs if r.name == "distributed"))
    return next(s.version for s in spec if s.operator in ("==", ">="))


@pytest.mark.slow
def test_the_dask_cuda_table_matches_the_index(tmp_path):
    """Fails when dask-cuda publishes a release the table lacks: add its row (the test says)."""
    floor = min(map(Version, RELEASES))
    rdd = _index_versions("rapids-dask-dependency")
    cuda = [v for v in _index_versions("dask-cuda") if v >= floor]
    with ThreadPoolExecutor(4) as pool:  # one pip process per wheel: a few at a time
        wheels = dict(
            zip(cuda, pool.map(lambda v: _requires("dask-cuda", v, tmp_path), cuda), strict=True)
        )
        bounds = {
            v: next(r.specifier for r in reqs if r.name == "rapids-dask-dependency")
            for v, (_, reqs) in wheels.items()
        }
        wanted = [v for v in rdd if any(v in bound for bound in bounds.values())]
        pins = pool.map(
            lambda v: _pinned_dask(_requires("rapids-dask-dependency", v, tmp_path)[1]), wanted
        )
        pinned = dict(zip(wanted, pins, strict=True))
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for version, (python, reqs) in wheels.items():
        extras = {str(m).split('"')[1] for r in reqs if (m := r.marker) and "extra" in str(m)}
        assert ("cu12" in extras) == (version >= Version(FIRST_WITH_CUDA_EXTRAS)), version
        dasks = {pinned[v] for v in wanted if v in bounds[version]}
        found[str(version)] = (python, tuple(sorted(dasks, key=Version)))
    assert found == RELEASES, f"update RELEASES in dask_amlcompute/backend/daskcuda.py to {found}"
