"""The node environment: what the AML job's nodes run on.

The default environment pins the packages that must match between the client
and the nodes to the client's own versions, so a version mismatch cannot
happen by accident:

* Python major.minor (conda ``python=X.Y``);
* ``dask``, ``distributed``, ``cloudpickle`` (pip ``==``);
* the data stack the client has installed (``numpy``, ``pandas``,
  ``pyarrow``, and ``adlfs`` for datastores): ``dask.dataframe`` work and
  datastore reads need them on the nodes even when the client imports them
  only after the cluster starts;

plus, unpinned, what the node side needs besides them: the mlflow pieces that
publish the scheduler's address (``mlflow-skinny``, ``azureml-mlflow``), the
dashboard (``bokeh``), the library's own small dependencies (``isodate``,
``tqdm``) and ``strictyaml`` (see :data:`NODE_HELPERS`). Every requirement is on the public package index: AML builds the
image from it, and one requirement no index has fails the build and the job.

dask-amlcompute itself is NOT a requirement (no index has it): it reaches the
nodes in the jobs' code snapshot (:mod:`~dask_amlcompute.backend.snapshot`).
``node_package=`` (setting ``node-package``) is the explicit override: a pip
requirement the nodes can install (a wheel URL, ``git+https://...``); the
snapshot then leaves the library out.

It is an *inline* AML environment (base image + conda file). The SDK registers
inline environments anonymously, named by a hash of their content
(``CliV2AnonymousEnvironment:<hash>``), so AML builds each distinct spec once
and reuses it; :attr:`NodeEnvironmentSpec.aml_version` is that hash.
``dask-amlcompute env build`` registers the same spec under a name of its own.
See ``docs/environment.md``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..exceptions import ConfigurationError
from .daskcuda import CUDA_IMAGE, dask_cuda_requirement

DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"

#: Pinned to the client's versions, always; a conflicting user pin is an error.
CORE_PACKAGES = ("dask", "distributed", "cloudpickle")
#: Pinned to the client's versions when installed (``stack="imported"``: only when imported).
DATA_STACK = ("numpy", "pandas", "pyarrow", "adlfs")
#: The library itself (never a requirement unless ``node_package`` names it).
LIBRARY = "dask-amlcompute"
#: Installed on the nodes without a pin: run tags (mlflow), the dashboard (bokeh), the
#: library's own dependencies that its node side imports (isodate, tqdm), and strictyaml:
#: azure-ai-ml imports it on the client, where it registers ``warnings`` filters naming its
#: own warning classes, and scikit-learn ships the client's ``warnings.filters`` with every
#: joblib task (``sklearn.utils.parallel``); nodes without strictyaml cannot unpickle those
#: tasks (found on the strict emulator: GridSearchCV with the dask backend hung).
NODE_HELPERS = (
    "azureml-mlflow",
    "bokeh>=3.1.0",
    "isodate",
    "mlflow-skinny",
    "strictyaml",
    "tqdm",
)

STACK_CHOICES = ("imported", "installed", "none")

_NAME = re.compile(r"^\s*(?:[\w.-]+::)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def local_python() -> str:
    """The client's Python version as ``major.minor``."""
    return ".".join(map(str, sys.version_info[:2]))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def local_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` in the client, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def pinned_packages(stack: str = "installed") -> dict[str, str]:
    """The client's versions of the packages the nodes must match.

    Parameters
    ----------
    stack
        Which of :data:`DATA_STACK` to pin: ``"imported"`` (installed
        and imported in this process), ``"installed"``, or ``"none"``.

    Returns
    -------
    dict
        Distribution name -> version, the library included.
    """
    if stack not in STACK_CHOICES:
        raise ConfigurationError(f"stack must be one of {STACK_CHOICES}, not {stack!r}.")
    import cloudpickle
    import dask
    import distributed

    from .._version import __version__

    pins = {
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "cloudpickle": cloudpickle.__version__,
    }
    for name in DATA_STACK:
        if stack == "none" or (stack == "imported" and name not in sys.modules):
            continue
        version = local_version(name)
        if version:
            pins[name] = version
    pins[LIBRARY] = __version__
    return pins


def library_requirement(node_package: str | None = None) -> str | None:
    """The pip requirement that installs dask-amlcompute on the nodes, if any.

    Parameters
    ----------
    node_package
        A pip requirement (``"dask-amlcompute @ https://.../x.whl"``, a wheel
        URL, ``"git+https://...@v0.1.0"``); None (the default): no requirement,
        the library travels in the code snapshot.
    """
    if node_package is None or not str(node_package).strip():
        return None
    return str(node_package).strip()


def library_in_snapshot(node_package: str | None, pip_packages: Iterable[str] | None) -> bool:
    """Whether the jobs' code snapshot must carry the library (nothing else installs it).

    Parameters
    ----------
    node_package, pip_packages
        The settings of the same names: either can give a requirement that
        installs dask-amlcompute on the nodes instead.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    if library_requirement(node_package):
        return False
    for text in _as_list(pip_packages, "pip_packages"):
        try:
            if _canonical(Requirement(text).name) == LIBRARY:
                return False
        except InvalidRequirement:
            continue
    return True


def _as_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{what} must be a list of strings, got {value!r}.")
    return [v.strip() for v in value if v.strip()]


@dataclass(frozen=True)
class NodeEnvironmentSpec:
    """The content of the default node environment.

    Attributes
    ----------
    python
        ``major.minor`` of the nodes' Python (conda ``python=X.Y``).
    pins
        Distribution -> version pinned to the client's (library excluded).
    library
        pip requirement installing dask-amlcompute (``node_package``), or None
        when it travels in the code snapshot (the default).
    pip
        Everything pip installs, in order: pins, library (if any), helpers, user extras.
    conda
        Extra conda packages (after ``python`` and ``pip``).
    image
        Base Docker image.
    overridden
        Scientific packages whose automatic pin a user requirement replaced.
    """

    python: str
    pins: Mapping[str, str]
    library: str | None
    pip: tuple[str, ...]
    conda: tuple[str, ...] = ()
    image: str = DEFAULT_IMAGE
    overridden: tuple[str, ...] = field(default=())

    def conda_dict(self) -> dict[str, Any]:
        """The conda environment file, as a dict (what AML's ``conda_file`` takes)."""
        return {
            "name": "dask-amlcompute",
            "channels": ["conda-forge"],
            "dependencies": [f"python={self.python}", "pip", *self.conda, {"pip": list(self.pip)}],
        }

    def conda_yaml(self) -> str:
        """The conda environment file as YAML text."""
        return yaml.safe_dump(self.conda_dict(), sort_keys=False)

    def requirements(self) -> str:
        """A pip ``requirements.txt`` (Python and conda packages are not in it)."""
        head = f"# dask-amlcompute node requirements for Python {self.python}"
        return "\n".join([head, *self.pip]) + "\n"

    @property
    def content_hash(self) -> str:
        """A short hash of image and conda spec: changes exactly when the content does."""
        payload = json.dumps({"image": self.image, "conda": self.conda_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_environment(self, name: str | None = None) -> Any:
        """The AML ``Environment`` built from this spec.

        Parameters
        ----------
        name
            None: an inline (anonymous) environment, as jobs use it; a name: a
            named environment whose version is :attr:`content_hash` (what
            ``dask-amlcompute env build`` registers).
        """
        from azure.ai.ml.entities import Environment

        return Environment(
            name=name,
            version=self.content_hash if name else None,
            image=self.image,
            conda_file=self.conda_dict(),
            description=(
                "dask-amlcompute node environment pinned to the client's versions "
                f"(spec {self.content_hash})"
            ),
        )

    @property
    def aml_version(self) -> str:
        """The version AML files this environment under (``CliV2AnonymousEnvironment``).

        Computed by azure-ai-ml from image and conda file, exactly as it names
        the environment when a job uses it.
        """
        return str(self.to_environment().version)

    def dockerfile(self) -> str:
        """A Dockerfile that bakes this spec into an image (see ``docker/README.md``)."""
        conda = " ".join([f'"python={self.python}"', "pip", *(f'"{c}"' for c in self.conda)])
        pip = " \\\n        ".join(f'"{p}"' for p in self.pip)
        lines = [
            f"# Generated by `dask-amlcompute env --format dockerfile` (spec {self.content_hash})",
            *(
                ["# dask-amlcompute itself arrives in each job's code snapshot"]
                if self.library is None
                else []
            ),
            f"FROM {self.image}",
            *(  # AML's job SSH service needs it; its CPU image has it (see daskcuda.NO_SSH_SERVER)
                [
                    "RUN apt-get update && apt-get install -y --no-install-recommends "
                    "openssh-server \\\n    && rm -rf /var/lib/apt/lists/*"
                ]
                if self.image == CUDA_IMAGE
                else []
            ),
            "ENV DASK_AMLCOMPUTE_ENV=/opt/dask-amlcompute",
            f'RUN conda create -y -p "$DASK_AMLCOMPUTE_ENV" -c conda-forge --override-channels '
            f"{conda} \\\n    && conda clean -afy",
            "ENV PATH=/opt/dask-amlcompute/bin:$PATH",
            f"RUN python -m pip install --no-cache-dir \\\n        {pip}",
            'RUN python -c "import dask, distributed, cloudpickle"',
        ]
        return "\n".join(lines) + "\n"


def _merge_pip(
    pins: dict[str, str], extras: list[str], library: str | None
) -> tuple[list[str], str | None, list[str], dict[str, set[str]]]:
    """Fold user pip requirements into ``pins`` (updated in place).

    Returns the user requirements still to install, the library requirement,
    the scientific packages whose pin was replaced, and pip extras of pins.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    kept: list[str] = []
    overridden: list[str] = []
    pin_extras: dict[str, set[str]] = {}
    for text in extras:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            kept.append(text)  # a bare URL or path: pip's business, nothing to compare
            continue
        name = _canonical(req.name)
        if name == LIBRARY:
            if library is not None:
                raise ConfigurationError(
                    f"pip_packages has {text!r} and node_package={library!r} is set: "
                    "give the library's requirement once, as node_package."
                )
            library = text
            continue
        if name not in pins:
            version = local_version(name) if name in DATA_STACK else None
            if version and not req.specifier and not req.url:
                pins[name] = version  # a known package the client has: pin it too
                pin_extras.setdefault(name, set()).update(req.extras)
            else:
                kept.append(text)
            continue
        local = pins[name]
        if not req.url and (not req.specifier or req.specifier.contains(local, prereleases=True)):
            pin_extras.setdefault(name, set()).update(req.extras)  # the pin satisfies it
            continue
        if name in CORE_PACKAGES:
            raise ConfigurationError(
                f"pip_packages asks for {text!r}, but this client runs {name} {local} and the "
                f"nodes must run the same version (the default environment pins {name}=={local}). "
                f"Remove it from pip_packages, or install it locally (pip install '{text}') so "
                "the pin follows."
            )
        del pins[name]  # documented precedence: a user's scientific pin wins
        overridden.append(name)
        kept.append(text)
    return kept, library, overridden, pin_extras


def _conda_satisfied(constraint: str, local: str) -> bool:
    """Whether a conda version constraint (``=1.2``, ``==1.2.3``, ``>=1``) admits ``local``."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    c = constraint.split()[0] if constraint.split() else ""
    if c.startswith("=="):
        return c[2:] == local
    if c.startswith(("<", ">", "!", "~")):
        try:
            return SpecifierSet(c).contains(local, prereleases=True)
        except InvalidSpecifier:
            return False
    c = c.lstrip("=").rstrip("*").rstrip(".")
    return local == c or local.startswith(c + ".")


def _merge_conda(python: str, pins: Mapping[str, str], extras: list[str]) -> list[str]:
    """Check user conda packages against the pins; returns the ones to install."""
    kept = []
    for text in extras:
        m = _NAME.match(text)
        if not m:
            raise ConfigurationError(f"conda_packages: cannot read {text!r}.")
        name, constraint = _canonical(m.group(1)), m.group(2).strip()
        local = python if name == "python" else pins.get(name)
        if name == "pip" or (name == "python" and not constraint):
            continue  # always there
        if local is not None and constraint:
            if not _conda_satisfied(constraint, local):
                raise ConfigurationError(
                    f"conda_packages asks for {text!r}, but this client runs {name} {local} and "
                    "the nodes must match it. Remove the version (the default environment pins "
                    "the client's) or change the client's version."
                )
            if name == "python":
                continue
        kept.append(text)
    return kept


def build_spec(
    *,
    extra_pip: Iterable[str] | None = None,
    extra_conda: Iterable[str] | None = None,
    node_package: str | None = None,
    image: str | None = None,
    stack: str = "installed",
    gpu: bool = False,
) -> NodeEnvironmentSpec:
    """The default node environment for this client, with the user's extra packages.

    Precedence when a user package names a pinned one: an unversioned or
    compatible requirement keeps the client's pin (extras such as
    ``dask[dataframe]`` are kept); an incompatible one is an error for Python,
    dask, distributed and cloudpickle, and replaces the automatic pin for
    numpy/pandas/pyarrow (the version check then warns about the difference).
    An unversioned numpy/pandas/pyarrow that the client has installed is
    pinned to the client's version.

    Parameters
    ----------
    extra_pip
        More pip requirements for the nodes.
    extra_conda
        More conda packages for the nodes (conda-forge).
    node_package
        pip requirement installing dask-amlcompute (see :func:`library_requirement`);
        None: the library travels in the code snapshot instead.
    image
        Base image (default :data:`DEFAULT_IMAGE`).
    stack
        Which scientific packages to pin: ``"imported"``, ``"installed"`` or ``"none"``.
    gpu
        For GPU nodes: the dask-cuda release that runs the client's dask (see
        :func:`~dask_amlcompute.backend.daskcuda.dask_cuda_requirement`), on
        :data:`~dask_amlcompute.backend.daskcuda.CUDA_IMAGE` unless ``image`` is given.

    Raises
    ------
    ConfigurationError
        A user package conflicts with a version the nodes must share with the client,
        or (``gpu``) no dask-cuda release runs the client's dask.
    """
    python = local_python()
    pins = pinned_packages(stack)
    pins.pop(LIBRARY)
    extra_pip = _as_list(extra_pip, "pip_packages")
    if gpu:
        extra_pip.append(dask_cuda_requirement(pins["dask"], python))
    pip_extras, library, overridden, pin_extras = _merge_pip(pins, extra_pip, node_package)
    conda = _merge_conda(python, pins, _as_list(extra_conda, "conda_packages"))
    named = {_canonical(re.split(r"[\s\[<>=!~;@]", p, maxsplit=1)[0]) for p in pip_extras}
    helpers = [h for h in NODE_HELPERS if _canonical(re.split(r"[<>=]", h)[0]) not in named]
    pinned = []
    for name, version in sorted(pins.items()):
        extra = sorted(pin_extras.get(name, ()))
        pinned.append(f"{name}[{','.join(extra)}]=={version}" if extra else f"{name}=={version}")
    lib = library_requirement(library)
    pip = tuple(dict.fromkeys([*pinned, *([lib] if lib else []), *helpers, *sorted(pip_extras)]))
    return NodeEnvironmentSpec(
        python=python,
        pins=dict(sorted(pins.items())),
        library=lib,
        pip=pip,
        conda=tuple(dict.fromkeys(sorted(conda))),
        image=image or (CUDA_IMAGE if gpu else DEFAULT_IMAGE),
        overridden=tuple(overridden),
    )


def resolve_environment(
    environment: Any,
    extra_pip: Iterable[str] | None = None,
    *,
    extra_conda: Iterable[str] | None = None,
    node_package: str | None = None,
    gpu: bool = False,
) -> Any:
    """Turn the user's ``environment=`` into what ``azure.ai.ml.command`` accepts.

    Parameters
    ----------
    environment
        ``None`` for the default pinned environment; an ``Environment`` entity;
        ``"name@latest"``, ``"name:version"`` or ``"azureml:..."`` for a
        registered environment; a Docker image reference (contains ``/``).
        Anything but None is used unchanged.
    extra_pip, extra_conda, node_package
        Extra packages and the library's requirement for the default
        environment (see :func:`build_spec`).
    gpu
        The nodes have GPUs: the default environment adds dask-cuda on the CUDA
        image (see :func:`build_spec`; a user environment is used as it is).

    Raises
    ------
    ConfigurationError
        Extra packages were given with a user environment (add them to that
        environment instead), or they conflict with the pins.
    """
    from azure.ai.ml.entities import Environment

    if environment is None:
        # Inline (anonymous) environment: AML names it by a hash of its content,
        # so it is built once per distinct spec and reused afterwards.
        spec = build_spec(
            extra_pip=extra_pip, extra_conda=extra_conda, node_package=node_package, gpu=gpu
        )
        return spec.to_environment()
    extras = _as_list(extra_pip, "pip_packages") + _as_list(extra_conda, "conda_packages")
    if extras or node_package:
        raise ConfigurationError(
            "pip_packages, conda_packages and node_package apply to the default environment "
            f"only; environment={environment!r} is used as it is. Add {extras or node_package} "
            "to that environment, or drop environment= to use the pinned default."
        )
    if isinstance(environment, Environment):
        return environment
    if not isinstance(environment, str) or not environment.strip():
        raise ConfigurationError(
            "environment must be None, a string ('name@latest', 'name:version', a Docker image) "
            f"or an azure.ai.ml.entities.Environment, got {type(environment).__name__} "
            f"{environment!r}."
        )
    if "/" in environment and not environment.startswith("azureml:"):
        return Environment(image=environment)
    return environment


def environment_from_settings(settings: Any, gpu: bool = False) -> Any:
    """:func:`resolve_environment` for a :class:`~dask_amlcompute.config.ClusterSettings`."""
    return resolve_environment(
        settings.environment,
        settings.pip_packages,
        extra_conda=settings.conda_packages,
        node_package=settings.node_package,
        gpu=gpu,
    )
