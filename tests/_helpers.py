"""Helpers shared by tests in any folder (importable as ``_helpers``: see ``_ssh_helpers``)."""

from __future__ import annotations

import time
from typing import Any


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
