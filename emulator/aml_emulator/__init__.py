"""Local emulator of the slice of the Azure ML workspace API that dask-amlcompute uses.

An offline stand-in for tests and demos (not a production engine): it serves
the ARM/run-history/mlflow routes the unmodified ``azure-ai-ml`` SDK calls and
runs each job node as a local process group.  See ``README.md`` next to this
file.

Imports are lazy: importing this package starts nothing and imports no
third-party module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .azurite import Azurite
    from .client import EmulatorCredential, EmulatorTransport, make_ml_client
    from .config import (
        ComputeSpec,
        EmulatorConfig,
        EnvironmentSpec,
        QuotaSpec,
        VmSizeSpec,
        load_config,
    )
    from .datastores import DatastoreSpec
    from .emulator import Emulator

__all__ = [
    "Azurite",
    "ComputeSpec",
    "DatastoreSpec",
    "Emulator",
    "EmulatorConfig",
    "EmulatorCredential",
    "EmulatorTransport",
    "EnvironmentSpec",
    "QuotaSpec",
    "VmSizeSpec",
    "load_config",
    "make_ml_client",
    "run_emulator_cli",
]

_EXPORTS = {
    "Azurite": "azurite",
    "DatastoreSpec": "datastores",
    "ComputeSpec": "config",
    "EmulatorConfig": "config",
    "EnvironmentSpec": "config",
    "QuotaSpec": "config",
    "VmSizeSpec": "config",
    "load_config": "config",
    "Emulator": "emulator",
    "EmulatorCredential": "client",
    "EmulatorTransport": "client",
    "make_ml_client": "client",
    "run_emulator_cli": "cli",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
