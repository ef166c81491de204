"""Helpers shared by the library's tests (importable as ``_helpers``: pyproject's ``pythonpath``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from _emu_helpers import wait_for  # the emulator's tests' helpers, shared
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dask_amlcompute.backend.daskcuda import RELEASES
from dask_amlcompute.backend.environment import local_python

__all__ = [
    "FAST_CLUSTER",
    "GPU_DASK",
    "LIBRARY_LINES",
    "NO_GPU_DASK",
    "env_in_dask_config",
    "fake_distribution",
    "foreign_lines",
    "make_tree",
    "wait_for",
]

#: Cluster arguments that make a cluster start fast and fail fast on the emulator.
FAST_CLUSTER: dict[str, Any] = {
    "threads_per_process": 1,
    "poll_interval": 0.2,
    "watch_interval": 1,
    "startup_timeout": "90s",
    "death_timeout": "60s",
    "quiet": True,
    # the lighter environment of before the sync default (built once, small): tests of package
    # sync (tests/emulated/test_package_sync.py) ask for stack="sync"
    "stack": "installed",
}


#: The newest dask a dask-cuda release runs with on this Python (the shipped table's answer),
#: and one no release runs with (between dask-cuda 26.10's 2026.7.1 and whatever comes next).
GPU_DASK = max(
    (d for py, ds in RELEASES.values() if SpecifierSet(py).contains(local_python()) for d in ds),
    key=Version,
)
NO_GPU_DASK = "2026.8.0"


def make_tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (relative path: text) under ``root``; return ``root``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


#: The cluster's progress lines (``cluster._log``), the only lines of the library's own
#: that reach a user's screen (each a regular expression for a whole line).
LIBRARY_LINES = (
    r"(Submitting|Reconnecting to) AML job \S+.*",
    r"Studio: \S+",
    r"AML job \S+: .+",
    r"Scheduler at \S+ \(client uses \S+\)",
    r"Compute \S+: .+|Compute \S+ exists: .+|(Creat|Delet)(ing|ed) AmlCompute .+",
    r"(Worker jobs on compute|Serverless:|Quota:|GPU nodes:|GPU size) .+",
    r"AML releases the nodes of \S+ .+",
    r"(Submitting|Cancelled) worker job .+|Worker job \S+ .+|Not submitting \S+: .+",
    r"(Asked for \d+ workers|Scaling to \d+ worker job).+",
    r"\S+ is not reachable directly; trying .+",
    r"(Waiting for|Connected through) the SSH service of AML job .+",
    r"SSH tunnel via \S+ to \S+",
    r"Dashboard published on this compute instance: \S+",
    r"The cluster reaches its job_timeout .+",
)


def foreign_lines(text: str, *allowed: str) -> list[str]:
    """The lines of ``text`` that are neither a :data:`LIBRARY_LINES` line nor ``allowed``.

    A blank line, a colour code, an SDK progress bar or warning: anything else shows.
    """
    patterns = [re.compile(p) for p in (*LIBRARY_LINES, *allowed)]
    return [line for line in text.splitlines() if not any(p.fullmatch(line) for p in patterns)]


@contextlib.contextmanager
def env_in_dask_config(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> Iterator[None]:
    """Set the environment variable ``name`` and have dask config read it, for a block only."""
    monkeypatch.setenv(name, value)
    dask.config.refresh()
    try:
        yield
    finally:
        monkeypatch.delenv(name)
        dask.config.refresh()


#: Variables that would route or bypass the proxy if the environment had them.
PROXY_VARIABLES = [f"{name}_proxy" for name in ("http", "https", "no", "all", "ws", "wss")]


def clear_proxy_env(monkeypatch) -> None:
    """Unset every proxy variable (both spellings) for the test: the machine's must not leak in."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@contextlib.contextmanager
def http_proxy(workdir: Path) -> Iterator[tuple[str, Path]]:
    """Run proxy.py on a free loopback port; yield its URL and its log file."""
    port_file, log = workdir / "proxy.port", workdir / "proxy.log"
    argv = ["--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    argv += ["--log-file", str(log), "--num-workers", "1", "--num-acceptors", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", *argv],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = wait_for(
            lambda: port_file.exists() and port_file.read_text().strip(), 30, "proxy.py's port"
        )
        yield f"http://127.0.0.1:{port.split()[0]}", log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def fake_distribution(
    site: Path,
    name: str,
    version: str,
    *,
    requires: tuple[str, ...] = (),
    files: dict[str, str] | None = None,
    direct_url: str | None = None,
) -> Path:
    """Install a distribution the way pip leaves it: ``files`` (path -> text) in ``site``, and a
    ``.dist-info`` with METADATA, RECORD and, for a non-index install, PEP 610 ``direct_url.json``
    (``direct_url``: the project folder; editable)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    (info / "METADATA").write_text("\n".join([*meta, *(f"Requires-Dist: {r}" for r in requires)]))
    for rel, text in (files or {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    if direct_url:
        url = {"url": Path(direct_url).as_uri(), "dir_info": {"editable": True}}
        (info / "direct_url.json").write_text(json.dumps(url))
    record = [*(files or {}), f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in record))
    return info
