"""Dask clusters on Azure Machine Learning compute clusters (AmlCompute).

>>> from dask.distributed import Client
>>> from dask_amlcompute import AmlComputeCluster
>>> cluster = AmlComputeCluster(ml_client, compute="cpu-cluster", n_nodes=4)  # doctest: +SKIP
>>> client = Client(cluster)  # doctest: +SKIP
"""

from . import config as _config
from ._version import __version__
from .cluster import AmlComputeCluster
from .exceptions import (
    AmlComputeError,
    ComputeNotFoundError,
    ConfigurationError,
    ControlPlaneError,
    JobCanceledError,
    JobError,
    JobFailedError,
    NotAmlComputeError,
    SchedulerUnreachableError,
    StartupTimeoutError,
    TooManyNodesError,
    VersionMismatchError,
    WorkspaceNotConfiguredError,
)
from .workspace import ml_client_from_config, write_workspace_config

# Like distributed and dask-jobqueue: make amlcompute.* defaults visible in dask.config.
_config.ensure_defaults()

__all__ = [
    "AmlComputeCluster",
    "AmlComputeError",
    "ComputeNotFoundError",
    "ConfigurationError",
    "ControlPlaneError",
    "JobCanceledError",
    "JobError",
    "JobFailedError",
    "NotAmlComputeError",
    "SchedulerUnreachableError",
    "StartupTimeoutError",
    "TooManyNodesError",
    "VersionMismatchError",
    "WorkspaceNotConfiguredError",
    "__version__",
    "ml_client_from_config",
    "write_workspace_config",
]
