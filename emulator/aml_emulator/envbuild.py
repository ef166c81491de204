"""Build an environment's Python virtualenv, as AML builds the environment's image.

On AML an environment with a conda file is built into a Docker image before
its first job runs (the job stays in ``Preparing`` meanwhile); a requirement no
package index has fails the build, and with it the job. The emulator does the
same with one isolated virtualenv per environment:

* **Key**: a hash of the environment's content (image and conda file), so a
  given environment is built once and reused, as AML reuses the image.
* **Cache**: ``<root>/<key>/venv`` with the full installer output in
  ``<root>/<key>/build.log`` and a completion marker ``<root>/<key>/.complete``
  written only after success; ``<root>`` is ``$AML_EMULATOR_ENVS``,
  else ``envs`` in the emulator's cache folder
  (``~/.cache/aml-emulator/envs``). Processes building the same key
  serialise on ``<root>/<key>.lock`` (``flock``); the later one reuses the result.
* **Python**: the conda file's ``python=X.Y``; the emulator's own ``X.Y`` is
  its base interpreter (never its virtualenv's site-packages), another one is
  ``pythonX.Y`` from ``PATH``; none found fails the build, naming the version.
  Without a ``python=X.Y`` pin the emulator's own version is used.
* **Packages**: the conda file's ``pip:`` requirements come from the package
  index. Conda packages other than ``python`` and ``pip`` are a stand-in: they
  are installed with pip under the same name (``numpy=1.26`` as
  ``numpy==1.26.*``, channel prefixes and build strings dropped); one pip does
  not have fails the build (AML would install it from the conda channel).
* **Installer**: ``uv`` (``uv venv`` + ``uv pip install``, much faster with its
  cache) when installed, else ``python -m venv`` and pip.

Every wait is bounded by the build timeout; a canceled build's process group
(started by this module, ``start_new_session=True``) is terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import cache_dir
from .reaper import group_running

#: Name AML gives the image build log of a job.
BUILD_LOG_NAME = "azureml-logs/20_image_build_log.txt"
#: AML's job error when the environment's image build fails (``messageFormat`` and message).
BUILD_FAILED_FORMAT = "Image build failed. For more details, check log file {ArtifactPath}."
BUILD_FAILED_MESSAGE = BUILD_FAILED_FORMAT.format(ArtifactPath=BUILD_LOG_NAME)
#: Environment variable naming the build cache folder.
ENVS_VARIABLE = "AML_EMULATOR_ENVS"
#: Default bound on one build (lock wait included), in seconds.
DEFAULT_BUILD_TIMEOUT = 900.0
#: Seconds between SIGTERM and SIGKILL when a build is stopped.
KILL_GRACE = 3.0
#: Part of every key: bump when the layout or the way of building changes.
BUILD_FORMAT = 1

_PYTHON_PIN = re.compile(r"^python\s*={1,2}\s*(\d+)\.(\d+)(?:[.*\d]*)?$")
_CONDA_SPEC = re.compile(r"^\s*(?:[\w.-]+::)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


class EnvironmentBuildError(Exception):
    """The environment could not be built (the reason is also in the build log)."""


def default_envs_dir() -> Path:
    """Return the build cache folder.

    Returns
    -------
    pathlib.Path
        ``$AML_EMULATOR_ENVS``, else ``<emulator cache>/envs``.
    """
    root = os.environ.get(ENVS_VARIABLE)
    return Path(root) if root else cache_dir() / "envs"


def own_python() -> str:
    """Return the emulator's Python version as ``major.minor``.

    Returns
    -------
    str
        e.g. ``"3.11"``.
    """
    return "{}.{}".format(*sys.version_info[:2])


@dataclass(frozen=True)
class BuildPlan:
    """What building one environment takes.

    Attributes
    ----------
    key
        Content hash of the environment (the cache folder's name).
    image
        The environment's image (recorded; not pulled).
    python
        ``major.minor`` of the interpreter.
    pip
        Whether the conda file lists ``pip`` (it is then installed in the venv).
    requirements
        pip requirements, conda stand-ins first, in file order.
    conda
        The conda packages installed with pip as a stand-in (as written in the file).
    """

    key: str
    image: str | None
    python: str
    pip: bool
    requirements: tuple[str, ...]
    conda: tuple[str, ...] = ()

    def summary(self) -> list[str]:
        """Return human-readable lines describing the build (for logs).

        Returns
        -------
        list of str
            One line per fact.
        """
        lines = [
            f"environment {self.key}: image {self.image or '-'} (not pulled), Python {self.python}",
        ]
        if self.conda:
            lines.append(
                "conda packages installed with pip under the same name (stand-in): "
                + ", ".join(self.conda)
            )
        lines.append("pip requirements: " + (", ".join(self.requirements) or "-"))
        return lines


def parse_conda_file(conda: Any) -> dict[str, Any] | None:
    """Parse a conda file given as YAML text or as a mapping.

    Parameters
    ----------
    conda
        The environment's ``condaFile`` (REST properties hold YAML text).

    Returns
    -------
    dict or None
        The parsed file, None when there is none or it is not a mapping.
    """
    if isinstance(conda, str):
        import yaml

        try:
            conda = yaml.safe_load(conda)
        except yaml.YAMLError:
            return None
    return conda if isinstance(conda, dict) else None


def conda_to_pip(spec: str) -> str | None:
    """Translate a conda package spec into the pip requirement that stands in for it.

    Parameters
    ----------
    spec
        e.g. ``"conda-forge::numpy=1.26=py311_0"``, ``"scipy>=1.10"``.

    Returns
    -------
    str or None
        e.g. ``"numpy==1.26.*"``; None for ``python`` and ``pip``.
    """
    m = _CONDA_SPEC.match(spec)
    if not m:
        return spec.strip()
    name, rest = m.group(1), m.group(2).replace(" ", "")
    if name.lower() in ("python", "pip"):
        return None
    if not rest:
        return name
    if rest[0].isdigit():  # "numpy 1.26" is "numpy=1.26"
        rest = "=" + rest
    if rest.startswith("=="):
        return f"{name}=={rest[2:].split('=')[0]}"
    if rest.startswith("="):  # conda "=X.Y[=build]" means X.Y.*
        version = rest[1:].split("=")[0]
        return f"{name}=={version}" if version.endswith("*") else f"{name}=={version}.*"
    return name + rest


def plan_build(image: str | None, conda_file: Any) -> BuildPlan | None:
    """Work out how to build an environment.

    Parameters
    ----------
    image
        The environment's image.
    conda_file
        Its conda file (YAML text or mapping); None for an image-only environment.

    Returns
    -------
    BuildPlan or None
        None when there is no conda file (nothing to build: the image-only stand-in).
    """
    conda = parse_conda_file(conda_file)
    if conda is None:
        return None
    deps = conda.get("dependencies") or []
    if not isinstance(deps, list):
        deps = []
    python = own_python()
    has_pip = False
    standins: list[str] = []
    conda_specs: list[str] = []
    pip_reqs: list[str] = []
    for dep in deps:
        if isinstance(dep, dict):
            pip_reqs.extend(str(p).strip() for p in dep.get("pip") or [] if str(p).strip())
            continue
        text = str(dep).strip()
        m = _PYTHON_PIN.match(text)
        if m:
            python = f"{m.group(1)}.{m.group(2)}"
            continue
        name = _CONDA_SPEC.match(text)
        if name and name.group(1).lower() == "pip":
            has_pip = True
            continue
        req = conda_to_pip(text)
        if req:
            standins.append(req)
            conda_specs.append(text)
    content = {"image": image, "conda": conda, "format": BUILD_FORMAT}
    payload = json.dumps(content, sort_keys=True, default=str)
    key = hashlib.sha256(payload.encode()).hexdigest()[:20]
    return BuildPlan(
        key=key,
        image=image,
        python=python,
        pip=has_pip,
        requirements=(*standins, *pip_reqs),
        conda=tuple(conda_specs),
    )


def find_python(version: str) -> str:
    """Return the interpreter to build a ``version`` environment from.

    Parameters
    ----------
    version
        ``major.minor``.

    Returns
    -------
    str
        The emulator's base interpreter for its own version, else ``pythonX.Y`` on ``PATH``.

    Raises
    ------
    EnvironmentBuildError
        When no such interpreter exists.
    """
    if version == own_python():
        base = getattr(sys, "_base_executable", None) or sys.executable
        if base and os.access(base, os.X_OK):
            return base
        candidate = os.path.join(sys.base_prefix, "bin", f"python{version}")
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(f"python{version}")
    if found:
        return found
    raise EnvironmentBuildError(
        f"Python {version} is not available to the emulator: no python{version} on PATH "
        f"(the emulator itself runs Python {own_python()}). Install Python {version} or "
        "change the conda file's python= pin."
    )


def find_uv() -> str | None:
    """Return the ``uv`` executable (PyPI package ``uv``), if installed.

    Returns
    -------
    str or None
        Its path.
    """
    with contextlib.suppress(ImportError, FileNotFoundError):
        from uv import find_uv_bin

        return str(find_uv_bin())
    return shutil.which("uv")


@dataclass
class BuildResult:
    """A built (or reused) environment.

    Attributes
    ----------
    key
        The environment's content hash.
    venv
        The virtualenv's directory.
    reused
        True when a cached build was reused.
    seconds
        Time this call took (waiting for another process included).
    log_path
        The cached build's installer log.
    """

    key: str
    venv: str
    reused: bool
    seconds: float
    log_path: str


def _clean_environment() -> dict[str, str]:
    """The installer's environment: ours without the client's virtualenv and Python overrides."""
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


class EnvironmentBuilder:
    """Builds and caches environment virtualenvs (see the module docstring).

    Parameters
    ----------
    root
        Cache folder (default :func:`default_envs_dir`).
    timeout
        Bound on one build, lock wait included, in seconds.
    on_process
        ``on_process(pid, started)``: called when an installer process group
        starts (``True``) and ends (``False``), e.g. to register it with a reaper.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_BUILD_TIMEOUT,
        on_process: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.root = Path(root) if root else default_envs_dir()
        self.timeout = float(timeout)
        self.on_process = on_process
        #: PIDs (= process group ids) of installer processes running now.
        self.running: set[int] = set()

    def venv_dir(self, key: str) -> Path:
        """Return the virtualenv directory of a build.

        Parameters
        ----------
        key
            The build's content hash.

        Returns
        -------
        pathlib.Path
            ``<root>/<key>/venv``.
        """
        return self.root / key / "venv"

    def is_built(self, key: str) -> bool:
        """Return whether a completed build of ``key`` is cached.

        Parameters
        ----------
        key
            The build's content hash.

        Returns
        -------
        bool
            True when the completion marker and the interpreter exist.
        """
        return (self.root / key / ".complete").is_file() and os.access(
            self.venv_dir(key) / "bin" / "python", os.X_OK
        )

    async def build(
        self, plan: BuildPlan, note: Callable[[str], None] | None = None
    ) -> BuildResult:
        """Build the environment of ``plan``, or reuse its cached build.

        Parameters
        ----------
        plan
            From :func:`plan_build`.
        note
            Called with progress lines (e.g. "waiting for another process").

        Returns
        -------
        BuildResult
            The virtualenv.

        Raises
        ------
        EnvironmentBuildError
            The build failed or timed out (details in ``result``'s log file
            ``<root>/<key>/build.log``).
        asyncio.CancelledError
            When canceled; the running installer process group is stopped first.
        """
        started = time.monotonic()
        deadline = started + self.timeout
        folder = self.root / plan.key
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "build.log"
        with open(self.root / f"{plan.key}.lock", "w") as lock:
            await self._lock(lock, deadline, plan.key, note, log_path)
            try:
                if self.is_built(plan.key):
                    return BuildResult(
                        plan.key,
                        str(self.venv_dir(plan.key)),
                        True,
                        time.monotonic() - started,
                        str(log_path),
                    )
                await self._build_locked(plan, folder, log_path, deadline)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        seconds = time.monotonic() - started
        return BuildResult(plan.key, str(self.venv_dir(plan.key)), False, seconds, str(log_path))

    async def _lock(
        self,
        lock: Any,
        deadline: float,
        key: str,
        note: Callable[[str], None] | None,
        log_path: Path,
    ) -> None:
        """Take the cross-process lock of a build (bounded wait)."""
        noted = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if not noted and note is not None:
                note(f"environment {key} is being built by another process; waiting")
                noted = True
            if time.monotonic() >= deadline:
                message = (
                    f"timed out after {self.timeout:g}s waiting for another process "
                    f"building environment {key}"
                )
                raise EnvironmentBuildError(message)
            await asyncio.sleep(0.2)

    async def _build_locked(
        self, plan: BuildPlan, folder: Path, log_path: Path, deadline: float
    ) -> None:
        venv = self.venv_dir(plan.key)
        marker = folder / ".complete"
        marker.unlink(missing_ok=True)
        if venv.exists():
            await asyncio.to_thread(shutil.rmtree, venv, True)
        began = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as log:

            def say(line: str) -> None:
                log.write(line + "\n")
                log.flush()

            for line in plan.summary():
                say(f"[emulator] {line}")
            try:
                interpreter = find_python(plan.python)
            except EnvironmentBuildError as exc:
                say(f"[emulator] ERROR: {exc}")
                raise
            uv = find_uv()
            python = str(venv / "bin" / "python")
            reqs = folder / "requirements.txt"
            reqs.write_text("".join(r + "\n" for r in plan.requirements), encoding="utf-8")
            installs = ["-r", str(reqs)]
            has_installs = bool(plan.requirements)
            commands: list[list[str]]
            if uv:
                say(f"[emulator] installer: {uv} (uv)")
                create = [uv, "venv", "--no-config", "--python", interpreter]
                commands = [[*create, *(["--seed"] if plan.pip else []), str(venv)]]
                if has_installs:
                    # pip (and so AML's image build) compiles bytecode at install; uv does
                    # not by default, and nodes would then compile dask on every start
                    commands.append(
                        [uv, "pip", "install", "--no-config", "--compile-bytecode",
                         "--python", python, *installs]
                    )  # fmt: skip
            else:
                say("[emulator] installer: python -m venv + pip (uv is not installed)")
                with_pip = plan.pip or has_installs
                commands = [
                    [interpreter, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(venv)]
                ]
                if has_installs:
                    commands.append([python, "-m", "pip", "install", *installs])
            for cmd in commands:
                say("$ " + " ".join(cmd))
                code = await self._run(cmd, log, folder, deadline, say)
                if code != 0:
                    say(f"[emulator] ERROR: the installer exited with code {code}")
                    raise EnvironmentBuildError(
                        f"the installer exited with code {code} building environment "
                        f"{plan.key} (see {log_path})"
                    )
            seconds = time.monotonic() - began
            say(f"[emulator] built environment {plan.key} in {seconds:.1f}s")
        marker.write_text(
            json.dumps({"key": plan.key, "seconds": round(seconds, 3), "built": time.time()}),
            encoding="utf-8",
        )

    async def _run(
        self,
        cmd: list[str],
        log: Any,
        cwd: Path,
        deadline: float,
        say: Callable[[str], None],
    ) -> int:
        """Run one installer command in its own process group (bounded, cancelable)."""
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=str(cwd),
            env=_clean_environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self.running.add(proc.pid)
        if self.on_process is not None:
            self.on_process(proc.pid, True)
        try:
            left = max(0.0, deadline - time.monotonic())
            try:
                return await asyncio.wait_for(asyncio.shield(proc.wait()), left)
            except asyncio.TimeoutError:
                say(f"[emulator] ERROR: the build did not finish within {self.timeout:g}s")
                raise EnvironmentBuildError(
                    f"the build did not finish within {self.timeout:g}s"
                ) from None
        finally:
            await _stop_group(proc)
            self.running.discard(proc.pid)
            if self.on_process is not None:
                self.on_process(proc.pid, False)


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """Stop the process group this module started for ``proc`` (no-op once it ended)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE)
    # Leftovers of the group (the installer's children) go too: a group with members
    # left keeps its id, so it is still the one this module started.
    if group_running(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)
