"""Helpers shared by tests in any folder (importable as ``_helpers``: see ``_ssh_helpers``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import dask
import pytest

#: Cluster arguments that make a cluster start fast and fail fast on the emulator.
FAST_CLUSTER: dict[str, Any] = {
    "threads_per_process": 1,
    "poll_interval": 0.2,
    "watch_interval": 1,
    "startup_timeout": "90s",
    "death_timeout": "60s",
    "quiet": True,
}


def wait_for(
    predicate: Any, timeout: float = 20.0, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll ``predicate`` every ``interval`` seconds until truthy (bounded); return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


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
