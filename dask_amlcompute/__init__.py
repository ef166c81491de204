"""Dask clusters on Azure Machine Learning compute clusters (AmlCompute).

>>> from dask.distributed import Client
>>> from dask_amlcompute import AmlComputeCluster
>>> cluster = AmlComputeCluster(ml_client, compute="cpu-cluster", n_nodes=4)  # doctest: +SKIP
>>> client = Client(cluster)  # doctest: +SKIP
"""

# ruff: noqa: F405 (the exception types in __all__ come from the star import)
from importlib import import_module as _import_module
from typing import TYPE_CHECKING

from . import config as _config
from ._version import __version__
from .backend.sdknotices import install_log_filters as _install_log_filters
from .exceptions import *  # noqa: F403 (every exception type, nothing else)

if TYPE_CHECKING:
    from .backend.workspace import ml_client_from_config, write_workspace_config
    from .cluster import AmlComputeCluster

# Like distributed and dask-jobqueue: make amlcompute.* defaults visible in dask.config.
_config.ensure_defaults()

#: The public API imported on first use: ``import dask_amlcompute`` stays light, and so does
#: every node and worker process (they import the package, never the cluster).
_LAZY = {
    "AmlComputeCluster": "cluster",
    "ml_client_from_config": "backend.workspace",
    "write_workspace_config": "backend.workspace",
    "map_batches": "batch",
    "iter_batches": "batch",
    "ItemError": "batch",
    "submit_script": "jobmode",
    "ship_code": "code",
    "resolve_uri": "data",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    target = "resolve" if name == "resolve_uri" else name
    return getattr(_import_module(f"{__name__}.{module}"), target)


__all__ = [
    "AccessDeniedError",
    "AmlComputeCluster",
    "AmlComputeError",
    "ClusterLostError",
    "ComputeNotFoundError",
    "ConfigurationError",
    "ControlPlaneError",
    "EnvironmentBuildError",
    "EnvironmentNotFoundError",
    "ItemError",
    "JobCanceledError",
    "JobError",
    "JobFailedError",
    "NotAmlComputeError",
    "QuotaExceededError",
    "SchedulerUnreachableError",
    "StartupTimeoutError",
    "TooManyNodesError",
    "VersionMismatchError",
    "WorkspaceNotConfiguredError",
    "__version__",
    "iter_batches",
    "map_batches",
    "ml_client_from_config",
    "resolve_uri",
    "ship_code",
    "submit_script",
    "write_workspace_config",
]

_install_log_filters()  # before the SDK loads its job schemas (none load at import)
