"""Helpers shared by the library's tests (importable as ``_helpers``: pyproject's ``pythonpath``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dask
import pytest
from _emu_helpers import wait_for  # the emulator's tests' helper, shared

__all__ = ["FAST_CLUSTER", "env_in_dask_config", "wait_for"]

#: Cluster arguments that make a cluster start fast and fail fast on the emulator.
FAST_CLUSTER: dict[str, Any] = {
    "threads_per_process": 1,
    "poll_interval": 0.2,
    "watch_interval": 1,
    "startup_timeout": "90s",
    "death_timeout": "60s",
    "quiet": True,
}


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
