"""Helpers shared by the library's tests (importable as ``_helpers``: pyproject's ``pythonpath``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from _emu_helpers import wait_for  # the emulator's tests' helper, shared

__all__ = ["FAST_CLUSTER", "env_in_dask_config", "make_tree", "wait_for"]

#: Cluster arguments that make a cluster start fast and fail fast on the emulator.
FAST_CLUSTER: dict[str, Any] = {
    "threads_per_process": 1,
    "poll_interval": 0.2,
    "watch_interval": 1,
    "startup_timeout": "90s",
    "death_timeout": "60s",
    "quiet": True,
}


def make_tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (relative path: text) under ``root``; return ``root``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


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
