"""The GPU nodes' environment: which dask-cuda release and which CUDA base image.

Each dask-cuda release requires ``rapids-dask-dependency==YY.MM.*``, which pins one exact dask
and distributed: an unpinned ``dask-cuda`` beside ``dask==<client's>`` makes pip backtrack and
AML's image build fail after minutes. So the GPU environment pins the newest dask-cuda that
admits the client's dask, and refuses before submitting when none does. :data:`RELEASES` (from
pypi.org) ships with the library so the environment stays an offline function of the client;
``tests/unit/test_gpu_environment.py`` fails when it is out of date.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..exceptions import ConfigurationError

#: AML's CUDA 12 base image for GPU sizes (Ubuntu 22.04 like the CPU image). Supported
#: images per github.com/Azure/AzureML-Containers README (2026-03-16, commit 7482fea): the
#: ``openmpi5.0-cuda12.x`` and ``openmpi5.0-cuda13.1`` images; the former default
#: ``openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04`` is no longer listed. The dask-cuda wheels
#: chosen here install their CUDA 12 libraries through the ``cu12`` extra.
CUDA_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:latest"

#: Why the job's SSH service may not start on :data:`CUDA_IMAGE`: AML's job SSH needs
#: openssh-server in the image (learn.microsoft.com/azure/machine-learning/how-to-interactive-jobs,
#: "Make sure your job environment has the openssh-server ... packages installed"). The
#: last published Dockerfile of AML's CUDA image (openmpi4.1.0-cuda11.8) dropped it in
#: Dec 2022 (Azure/AzureML-Containers commit c1e93fb); the openmpi5.0-cuda12 images
#: publish no Dockerfile, so nothing says they have it.
NO_SSH_SERVER = (
    "AML's job SSH service needs openssh-server in the image, and AML does not document "
    "it in its CUDA base images (the default GPU environment's image)"
)

#: dask-cuda release -> (its Requires-Python, the dask versions its rapids-dask-dependency
#: releases pin, dask and distributed alike). From pypi.org, 2026-12-03; releases since 25.2.0.
RELEASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "25.2.0": (">=3.10", ("2024.12.1",)),
    "25.4.0": (">=3.10", ("2025.2.0",)),
    "25.6.0": (">=3.10", ("2025.5.0",)),
    "25.8.0": (">=3.10", ("2025.7.0",)),
    "25.10.0": (">=3.10", ("2025.9.1",)),
    "25.12.0": (">=3.10", ("2025.9.1", "2025.9.2")),
    "26.2.0": (">=3.10", ("2026.1.1",)),
    "26.4.0": (">=3.11", ("2026.1.1",)),
    "26.6.0": (">=3.11", ("2026.1.1",)),
    "26.8.0": (">=3.11", ("2026.7.1",)),
    "26.10.0": (">=3.11", ("2026.7.1",)),
}
#: The first release with the ``cu12``/``cu13`` extras (its CUDA libraries as wheels).
FIRST_WITH_CUDA_EXTRAS = "25.10.0"


def dask_cuda_requirement(dask: str, python: str) -> str:
    """The newest dask-cuda release for nodes that run ``dask`` on ``python`` (``major.minor``).

    Raises :class:`ConfigurationError` when no release admits this dask on this Python.

    Examples
    --------
    >>> dask_cuda_requirement("2026.7.1", "3.11")
    'dask-cuda[cu12]==26.10.0'
    """
    releases = {v: d for v, (py, d) in RELEASES.items() if SpecifierSet(py).contains(python)}
    fits = [v for v, versions in releases.items() if Version(dask) in map(Version, versions)]
    if not fits:
        known = sorted({d for versions in releases.values() for d in versions}, key=Version)
        raise ConfigurationError(
            f"No dask-cuda release runs with dask {dask}: each one pins a single dask version "
            "(through rapids-dask-dependency) and the nodes must run the client's. dask "
            f"versions with a dask-cuda on Python {python}: {', '.join(reversed(known))}. "
            "Install one of them here (pip install dask==X distributed==X), use "
            "gpu_workers='none' (plain Dask workers on the GPU nodes), or give environment= "
            "with your own dask-cuda. Nothing was submitted."
        )
    best = max(fits, key=Version)
    extra = "[cu12]" if Version(best) >= Version(FIRST_WITH_CUDA_EXTRAS) else ""
    return f"dask-cuda{extra}=={best}"
