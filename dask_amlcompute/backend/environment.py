"""The node environment: what the AML job's nodes run on (see ``docs/environment.md``).

``stack="sync"`` (the default) pins every installed distribution but :data:`CLIENT_ONLY` and what
only they require; one not from an index (PEP 610) travels in the code snapshot if pure Python.
``"installed"``/``"imported"`` pin :data:`CORE_PACKAGES` and the :data:`DATA_STACK` installed or
imported, ``"none"`` the core only. An *inline* AML environment: AML builds each content once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name as _canonical

from ..exceptions import ConfigurationError
from .daskcuda import CUDA_IMAGE, dask_cuda_requirement
from .snapshot import SnapshotFile, distribution_files

DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"

#: Pinned to the client's versions, always; a conflicting user pin is an error.
CORE_PACKAGES = ("dask", "distributed", "cloudpickle")
#: Pinned by ``stack="installed"`` when installed (``"imported"``: when imported too).
DATA_STACK = ("numpy", "pandas", "pyarrow", "adlfs")
#: Client-only tools (notebooks, linters, tests, build tools, the AML SDK and its emulator), and
#: names starting with :data:`CLIENT_ONLY_PREFIXES`: ``stack="sync"`` leaves out them and what
#: only they require.
CLIENT_ONLY = frozenset(
    """aml-emulator azure-ai-ml black build coverage debugpy flake8 ipykernel ipython
    ipywidgets isort jupyter jupyter-client jupyter-core jupyter-server jupyterlab
    jupyterlab-widgets mypy nbclient nbconvert nbformat notebook nox pip pre-commit pylint
    pyright pytest ruff setuptools tox twine uv wheel widgetsnbextension""".split()  # noqa: SIM905
)
CLIENT_ONLY_PREFIXES = ("pytest-", "types-", "sphinx")
#: The library itself (never a requirement unless ``node_package`` names it).
LIBRARY = _canonical("dask-amlcompute")
#: Installed on the nodes without a pin: run tags (mlflow), the dashboard (bokeh), what the node
#: side imports (isodate, jsonschema, tqdm), and strictyaml: azure-ai-ml registers ``warnings``
#: filters naming its warning classes, which scikit-learn ships with every joblib task.
NODE_HELPERS = ("azureml-mlflow", "bokeh>=3.1.0", "isodate", "jsonschema", "mlflow-skinny", "strictyaml",
                "tqdm")  # fmt: skip

_COMPILED = (".so", ".pyd", ".dylib")  # extension modules: such a local one cannot travel
_NAME = re.compile(r"^\s*(?:[\w.-]+::)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def local_python() -> str:
    """The client's Python version as ``major.minor``."""
    return ".".join(map(str, sys.version_info[:2]))


def _requirement(text: str) -> Requirement | None:
    """``text`` parsed; None for what is no requirement (a bare URL or path: pip's business)."""
    try:
        return Requirement(text)
    except InvalidRequirement:
        return None


def local_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` in the client, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def pinned_packages(stack: str = "sync") -> dict[str, str]:
    """The client's versions of the distributions the nodes get, by ``stack`` (library excluded)."""
    pins = {name: importlib.import_module(name).__version__ for name in CORE_PACKAGES}
    if stack == "sync":
        return {name: d.version for name, d in _synced().items() if not d.origin} | pins
    for name in DATA_STACK:
        version = local_version(name)
        if version and (stack == "installed" or (stack == "imported" and name in sys.modules)):
            pins[name] = version
    return pins


@dataclass(frozen=True)
class _Synced:  # a distribution stack="sync" gives the nodes, read once (see _synced_from)
    dist: importlib.metadata.Distribution
    version: str  # (each ``Distribution.version`` parses its METADATA again)
    origin: str | None  # where it comes from when not from an index (PEP 610), else None


def _described(dist: importlib.metadata.Distribution, meta: Any) -> _Synced:
    version, text = meta["Version"], dist.read_text("direct_url.json")  # PEP 610
    local = "a local build (its version has a local label)" if "+" in version else None
    return _Synced(dist, version, str(json.loads(text).get("url", "?")) if text else local)


def _synced() -> dict[str, _Synced]:
    """The distributions ``stack="sync"`` gives the nodes (see :data:`CLIENT_ONLY`), by name."""
    return _synced_from(
        tuple((p, os.stat(p).st_mtime_ns if os.path.isdir(p) else 0) for p in sys.path)
    )


@functools.lru_cache(maxsize=4)  # a cluster's start asks 3 times; an install changes the key
def _synced_from(places: tuple) -> dict[str, _Synced]:
    found = [(d, d.metadata) for d in reversed(list(importlib.metadata.distributions()))]
    dists = {_canonical(m["Name"]): (d, m) for d, m in found if m["Name"]}  # first on sys.path
    users: dict[str, set[str]] = {name: set() for name in dists}
    for name, (dist, meta) in dists.items():  # each METADATA parsed once (requires.txt: egg-info)
        requires = meta.get_all("Requires-Dist") or dist.requires or ()
        for req in filter(None, map(_requirement, requires)):
            if not req.marker or req.marker.evaluate({"extra": ""}):  # not an extra's
                users.get(_canonical(req.name), set()).add(name)
    kept = {n for n in dists if n not in CLIENT_ONLY and not n.startswith(CLIENT_ONLY_PREFIXES)}
    kept.add(LIBRARY)  # its requirements are the nodes' too
    while orphans := {n for n in kept if users.get(n) and not users[n] & kept}:
        kept -= orphans
    return {n: _described(*dists[n]) for n in sorted(kept) if n in dists and n != LIBRARY}


def local_packages(stack: str, pip_packages: Iterable[str] | None = None) -> list[SnapshotFile]:
    """Files of the synced distributions no index has, not named by ``pip_packages``."""
    if stack != "sync":
        return []
    named = _named(pip_packages) | set(CORE_PACKAGES)
    files: list[SnapshotFile] = []
    for name, synced in _synced().items():
        if name in named or (url := synced.origin) is None:
            continue
        found = distribution_files(synced.dist)
        compiled = [f for f, _ in found if f.endswith(_COMPILED)]
        compiled += [str(f) for f in synced.dist.files or () if str(f).endswith(_COMPILED)]
        if compiled:
            raise ConfigurationError(
                f"{name} {synced.version} is installed from {url}, not from a package index, and "
                f"has compiled extension modules ({compiled[0]}): it cannot travel in the code "
                f"snapshot. Give the nodes a requirement that installs it (pip_packages=['{name} "
                "@ https://.../x.whl'], or its name if an index has it), an environment= that "
                "has it, or stack='installed' (only dask and the data stack follow the client)."
            )
        files += found
    return files


def library_in_snapshot(node_package: str | None, pip_packages: Iterable[str] | None) -> bool:
    """Whether the snapshot must carry the library: neither setting gives its requirement."""
    return not (node_package or "").strip() and LIBRARY not in _named(pip_packages)


def _named(pip_packages: Iterable[str] | None) -> set[str]:
    """The distributions that requirements name (bare URLs and paths name none)."""
    return {_canonical(req.name) for req in map(_requirement, _as_list(pip_packages)) if req}


def _as_list(value: Iterable[str] | None) -> list[str]:
    """The non-blank entries of a (schema-checked) list setting, stripped."""
    return [v.strip() for v in value or () if v.strip()]


@dataclass(frozen=True)
class NodeEnvironmentSpec:
    """The content of the default node environment."""

    python: str
    pins: Mapping[str, str]
    library: str | None  # node_package; None: the library travels in the code snapshot
    pip: tuple[str, ...]  # pins, library, helpers, user extras
    conda: tuple[str, ...] = ()
    image: str = DEFAULT_IMAGE

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
        """A pip ``requirements.txt`` (without Python and conda packages)."""
        head = f"# dask-amlcompute node requirements for Python {self.python}"
        return "\n".join([head, *self.pip]) + "\n"

    @property
    def content_hash(self) -> str:
        """A short hash of image and conda spec: changes exactly when the content does."""
        payload = json.dumps({"image": self.image, "conda": self.conda_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_environment(self, name: str | None = None) -> Any:
        """The AML ``Environment``: inline, or named (version :attr:`content_hash`)."""
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
        """The version azure-ai-ml files this environment under (``CliV2AnonymousEnvironment``)."""
        return str(self.to_environment().version)

    def dockerfile(self) -> str:
        """A Dockerfile that bakes this spec into an image (see ``docker/README.md``)."""
        conda = " ".join([f'"python={self.python}"', "pip", *(f'"{c}"' for c in self.conda)])
        pip = " \\\n        ".join(f'"{p}"' for p in self.pip)
        lines = [
            f"# Generated by `dask-amlcompute env --format dockerfile` (spec {self.content_hash})",
            *["# dask-amlcompute itself arrives in each job's code snapshot"][: not self.library],
            f"FROM {self.image}",
            # AML's job SSH service needs it; its CPU image has it (see daskcuda.NO_SSH_SERVER)
            *[
                "RUN apt-get update && apt-get install -y --no-install-recommends "
                "openssh-server \\\n    && rm -rf /var/lib/apt/lists/*"
            ][: self.image == CUDA_IMAGE],
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
) -> tuple[list[str], str | None, dict[str, set[str]]]:
    """Fold user requirements into ``pins`` (in place): (still to install, library, pin extras)."""
    kept: list[str] = []
    pin_extras: dict[str, set[str]] = {}
    for text in extras:
        req = _requirement(text)
        if req is None:
            kept.append(text)  # nothing to compare
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
        # an unversioned requirement of a package the client has gets the client's version
        local = pins.get(name) or (None if req.specifier else local_version(name))
        ok = local and (not req.specifier or req.specifier.contains(local, prereleases=True))
        if ok and not req.url:
            pins[name] = str(local)
            pin_extras.setdefault(name, set()).update(req.extras)  # the pin satisfies it
            continue
        if name in CORE_PACKAGES:
            raise ConfigurationError(
                f"pip_packages asks for {text!r}, but this client runs {name} {local} and the "
                f"nodes must run the same version (the default environment pins {name}=={local}). "
                f"Remove it from pip_packages, or install it locally (pip install '{text}') so "
                "the pin follows."
            )
        pins.pop(name, None)  # documented precedence: a user's pin wins
        kept.append(text)
    return kept, library, pin_extras


def _conda_satisfied(constraint: str, local: str) -> bool:
    """Whether a conda constraint (``=1.2``, ``1.2*``, ``==1.2.3``, ``>=1``) admits ``local``."""
    if not constraint.startswith(("==", "<", ">", "!", "~")):  # "=1.2" and "1.2*": a prefix
        constraint = "==" + constraint.lstrip("=").rstrip("*").rstrip(".") + ".*"
    try:
        return SpecifierSet(constraint).contains(local, prereleases=True)
    except InvalidSpecifier:
        return False


def _merge_conda(python: str, pins: Mapping[str, str], extras: list[str]) -> list[str]:
    """Check user conda packages against the pins; returns the ones to install."""
    kept = []
    for text in extras:
        if not (m := _NAME.match(text)):
            raise ConfigurationError(f"conda_packages: cannot read {text!r}.")
        name, constraint = _canonical(m.group(1)), m.group(2).split()[:1]
        local = python if name == "python" else pins.get(name)
        if local and constraint and not _conda_satisfied(constraint[0], local):
            raise ConfigurationError(
                f"conda_packages asks for {text!r}, but this client runs {name} {local} and "
                "the nodes must match it. Remove the version (the default environment pins "
                "the client's) or change the client's version."
            )
        if name not in ("pip", "python"):  # always there
            kept.append(text)
    return kept


def build_spec(
    *,
    extra_pip: Iterable[str] | None = None,
    extra_conda: Iterable[str] | None = None,
    node_package: str | None = None,
    image: str | None = None,
    stack: str = "sync",
    gpu: bool = False,
) -> NodeEnvironmentSpec:
    """The default node environment for this client, with the user's extra packages.

    A user requirement of a pinned package keeps the pin if compatible (extras too), else replaces
    it (an error for Python and :data:`CORE_PACKAGES`); an unversioned one the client has is pinned.

    Parameters
    ----------
    extra_pip, extra_conda
        More pip requirements and conda-forge packages for the nodes.
    node_package
        pip requirement installing dask-amlcompute; None: it travels in the code snapshot.
    image
        Base image (default :data:`DEFAULT_IMAGE`, :data:`.daskcuda.CUDA_IMAGE` for ``gpu``).
    stack
        What follows the client: ``"sync"``, ``"installed"``, ``"imported"`` or ``"none"``.
    gpu
        Add the dask-cuda release that runs the client's dask.

    Raises
    ------
    ConfigurationError
        A conflict with a version the nodes must share, no dask-cuda for this dask (``gpu``),
        or a local distribution that cannot travel (``"sync"``).
    """
    python = local_python()
    pins = pinned_packages(stack)
    local_packages(stack, extra_pip)  # refuses what cannot travel, before anything is built
    extra_pip = _as_list(extra_pip)
    if gpu:
        extra_pip.append(dask_cuda_requirement(pins["dask"], python))
    pip_extras, library, pin_extras = _merge_pip(pins, extra_pip, node_package)
    conda = _merge_conda(python, pins, _as_list(extra_conda))
    named = _named(pip_extras) | set(pins)
    helpers = [h for h in NODE_HELPERS if _canonical(Requirement(h).name) not in named]
    extras = {name: f"[{','.join(sorted(e))}]" for name, e in pin_extras.items() if e}
    pinned = [f"{name}{extras.get(name, '')}=={version}" for name, version in sorted(pins.items())]
    lib = (library or "").strip() or None
    pip = tuple(dict.fromkeys([*pinned, *([lib] if lib else []), *helpers, *sorted(pip_extras)]))
    return NodeEnvironmentSpec(
        python=python,
        pins=dict(sorted(pins.items())),
        library=lib,
        pip=pip,
        conda=tuple(dict.fromkeys(sorted(conda))),
        image=image or (CUDA_IMAGE if gpu else DEFAULT_IMAGE),
    )


def environment_from_settings(settings: Any, gpu: bool = False) -> Any:
    """The ``environment`` of ``settings`` as ``azure.ai.ml.command`` accepts it.

    ``None``: the default environment (:func:`build_spec`, inline: AML names it by a hash of
    its content); an ``Environment``, ``"name@latest"``, ``"name:version"``, ``"azureml:..."``
    or an image (with ``/``) is used as it is, and extra packages with it are an error.
    """
    from azure.ai.ml.entities import Environment

    environment, node_package = settings.environment, settings.node_package
    if environment is None:
        return build_spec(
            extra_pip=settings.pip_packages,
            extra_conda=settings.conda_packages,
            node_package=node_package,
            gpu=gpu,
            stack=settings.stack,
        ).to_environment()
    extras = _as_list(settings.pip_packages) + _as_list(settings.conda_packages)
    if extras or node_package:
        raise ConfigurationError(
            "pip_packages, conda_packages and node_package apply to the default environment "
            f"only; environment={environment!r} is used as it is. Add {extras or node_package} "
            "to that environment, or drop environment= to use the pinned default."
        )
    if isinstance(environment, Environment):
        return environment
    if not isinstance(environment, str):
        raise ConfigurationError(
            "environment must be None, a string ('name@latest', 'name:version', a Docker image) "
            f"or an azure.ai.ml.entities.Environment, got {type(environment).__name__} "
            f"{environment!r}."
        )
    if "/" in environment and not environment.startswith("azureml:"):
        return Environment(image=environment)
    return environment
