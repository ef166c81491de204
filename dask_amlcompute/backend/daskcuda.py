"""The GPU nodes' environment: which dask-cuda release and which CUDA base image.

Each dask-cuda release pins one exact dask (through ``rapids-dask-dependency``): an unpinned
``dask-cuda`` beside ``dask==<client's>`` makes AML's image build backtrack and fail. So the GPU
environment pins the newest dask-cuda that admits the client's dask, and refuses when none does.
:data:`RELEASES` ships with the library (``tests/unit/test_gpu_environment.py`` checks pypi.org).
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..exceptions import ConfigurationError

#: AML's CUDA 12 base image for GPU sizes (Ubuntu 22.04 like the CPU image), one of the images
#: github.com/Azure/AzureML-Containers lists (README, commit 7482fea); dask-cuda's ``cu12`` extra
#: installs the matching CUDA libraries.
CUDA_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:latest"

#: Why the job's SSH service may not start on :data:`CUDA_IMAGE`: it needs openssh-server in the
#: image (learn.microsoft.com/azure/machine-learning/how-to-interactive-jobs); AML's last published
#: CUDA Dockerfile dropped it (Azure/AzureML-Containers c1e93fb), the cuda12 ones publish none.
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
