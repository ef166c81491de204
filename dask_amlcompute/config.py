"""Register dask-amlcompute's defaults with dask.config.

Like distributed and dask-jobqueue, the defaults YAML is merged into dask's
defaults when the package is imported (``dask.config.update_defaults`` only
fills in defaults; it never overrides a user's settings).
"""

from __future__ import annotations

import os

import dask.config
import yaml

_HERE = os.path.dirname(__file__)
DEFAULTS_FILE = os.path.join(_HERE, "amlcompute.yaml")
SCHEMA_FILE = os.path.join(_HERE, "amlcompute-schema.yaml")


def _load_defaults() -> dict:
    with open(DEFAULTS_FILE) as f:
        return yaml.safe_load(f)


_registered = False


def ensure_defaults() -> None:
    """Merge the package defaults into dask.config (idempotent)."""
    global _registered
    if not _registered:
        dask.config.update_defaults(_load_defaults())
        _registered = True


def get(key: str, override_with=None):
    """Read ``amlcompute.<key>`` from dask config unless ``override_with`` is given."""
    ensure_defaults()
    return dask.config.get(f"amlcompute.{key}", override_with=override_with)
