"""The node environment: what the AML job's nodes run on.

The default environment pins the packages that must match between the client
and the nodes (Python major.minor, dask, distributed, cloudpickle) to the
client's own versions, on an AML base image, so a version mismatch cannot
happen by accident.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"


def pinned_packages() -> dict[str, str]:
    """The client's versions of the packages the nodes must match."""
    import cloudpickle
    import dask
    import distributed

    from ._version import __version__

    return {
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "cloudpickle": cloudpickle.__version__,
        "dask-amlcompute": __version__,
    }


def conda_spec(extra_pip: list[str] | None = None) -> dict[str, Any]:
    """The conda specification of the default node environment.

    Parameters
    ----------
    extra_pip
        More pip requirements to install next to the pinned ones.
    """
    python = ".".join(map(str, sys.version_info[:2]))
    pip = [f"{name}=={version}" for name, version in pinned_packages().items()]
    pip += ["mlflow-skinny", "azureml-mlflow", *(extra_pip or [])]
    return {
        "name": "dask-amlcompute",
        "channels": ["conda-forge"],
        "dependencies": [f"python={python}", "pip", {"pip": pip}],
    }


def spec_hash(spec: dict[str, Any], image: str) -> str:
    """A short content hash naming an environment built from ``spec`` on ``image``."""
    payload = json.dumps({"image": image, "conda": spec}, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def resolve_environment(environment: Any, extra_pip: list[str] | None = None) -> Any:
    """Turn the user's ``environment=`` into what ``azure.ai.ml.command`` accepts.

    Parameters
    ----------
    environment
        ``None`` for the default pinned environment; an ``Environment`` entity;
        ``"name@latest"``, ``"name:version"`` or ``"azureml:..."`` for a
        registered environment; a Docker image reference (contains ``/``).
    extra_pip
        Extra pip packages for the default environment.
    """
    from azure.ai.ml.entities import Environment

    if isinstance(environment, Environment):
        return environment
    if environment is None:
        # Inline (anonymous) environment: AML names it by a hash of its content,
        # so it is built once per distinct spec and reused afterwards.
        spec = conda_spec(extra_pip)
        return Environment(
            image=DEFAULT_IMAGE,
            conda_file=spec,
            description="dask-amlcompute node environment pinned to the client's versions",
        )
    if not isinstance(environment, str) or not environment.strip():
        raise TypeError(f"environment must be a string or an Environment, got {environment!r}")
    if "/" in environment and not environment.startswith("azureml:"):
        return Environment(image=environment)
    return environment
