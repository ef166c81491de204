"""Version check: client vs scheduler vs workers.

A client and a cluster running different Python, dask, distributed or
cloudpickle versions fail later with obscure (un)pickling errors. This module
asks the scheduler for its own and its workers' versions (the scheduler's
``versions`` handler and a ``versions`` broadcast to the workers, the same
machinery as :meth:`distributed.Client.get_versions`), compares them with the
client's, and raises :class:`~dask_amlcompute.exceptions.VersionMismatchError`
(or warns) with a table of the differences and how to fix them.

Python is compared on major.minor (the node environment pins ``python=X.Y``;
patch releases share a pickle format).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distributed.core import rpc
from distributed.utils import asciitable
from distributed.versions import VersionMismatchWarning, get_versions

from ..exceptions import ConfigurationError, VersionMismatchError

logger = logging.getLogger(__name__)

#: Must match: a difference raises (policy ``raise``).
REQUIRED = ("python", "dask", "distributed", "cloudpickle")
#: Should match: a difference always only warns (if the client has the package).
OPTIONAL = ("msgpack", "numpy", "pandas", "pyarrow", "dask-amlcompute")
POLICIES = ("raise", "warn", "ignore")
MISSING = "MISSING"

#: Packages asked of every process beyond distributed's default list.
EXTRA_PACKAGES = ["pyarrow", "dask-amlcompute"]


@dataclass(frozen=True)
class Difference:
    """One package whose versions differ.

    Attributes
    ----------
    package
        Package name (``python`` for the interpreter).
    client, scheduler
        Their versions (``MISSING`` if absent).
    workers
        Worker address -> version.
    required
        True if the package must match (an error), False for a warning.
    """

    package: str
    client: str
    scheduler: str
    workers: Mapping[str, str]
    required: bool

    def workers_text(self) -> str:
        """``"3.1.2"`` or ``"3.1.2 (2 workers), 0.0.1 (1 worker)"``."""
        counts = Counter(self.workers.values())
        if len(counts) <= 1:
            return next(iter(counts), "-")
        return ", ".join(
            f"{v} ({n} worker{'s' if n > 1 else ''})" for v, n in sorted(counts.items())
        )

    def fix(self) -> str:
        """The local ``pip install`` that would match the cluster (when there is one version)."""
        remote = {self.scheduler, *self.workers.values()} - {MISSING}
        if self.package == "python" or len(remote) != 1:
            return ""
        return f"{self.package}=={remote.pop()}"


def validate_policy(policy: str) -> str:
    """Return ``policy`` if it is ``raise``, ``warn`` or ``ignore``; else raise."""
    if policy not in POLICIES:
        raise ConfigurationError(
            f"version_check must be one of {', '.join(POLICIES)}, not {policy!r}."
        )
    return policy


def _packages(info: Any) -> dict[str, str]:
    """The package dict of a ``get_versions()`` result (None values: ``MISSING``)."""
    if not isinstance(info, Mapping):
        return {}
    packages = info.get("packages", info)
    return {k: (str(v) if v is not None else MISSING) for k, v in packages.items()}


def _comparable(package: str, version: str) -> str:
    if package == "python" and version != MISSING:
        return ".".join(version.split(".")[:2])
    return version


def _shown(package: str, version: str) -> str:
    if package == "python" and version != MISSING:
        return ".".join(version.split(".")[:3])
    return version


def compare_versions(
    client: Mapping[str, Any], scheduler: Mapping[str, Any], workers: Mapping[str, Any]
) -> list[Difference]:
    """The packages whose versions differ between client, scheduler and workers.

    Parameters
    ----------
    client, scheduler
        ``distributed.versions.get_versions()`` results (or their ``packages``).
    workers
        Worker address -> ``get_versions()`` result; workers that did not
        answer (None) are left out.

    Returns
    -------
    list of Difference
        Required packages first, then optional ones present on the client.
    """
    c, s = _packages(client), _packages(scheduler)
    ws = {addr: _packages(v) for addr, v in workers.items() if v}
    out = []
    for package in (*REQUIRED, *OPTIONAL):
        required = package in REQUIRED
        mine = c.get(package, MISSING)
        if not required and mine == MISSING:
            continue  # the client does not use it: nothing to match
        theirs = {addr: p.get(package, MISSING) for addr, p in ws.items()}
        sched = s.get(package, MISSING)
        seen = {_comparable(package, v) for v in (mine, sched, *theirs.values())}
        if len(seen) > 1:
            out.append(
                Difference(
                    package=package,
                    client=_shown(package, mine),
                    scheduler=_shown(package, sched),
                    workers={a: _shown(package, v) for a, v in theirs.items()},
                    required=required,
                )
            )
    return out


def format_differences(differences: list[Difference], where: str = "the cluster") -> str:
    """A readable report: a table of the differences and how to fix them."""
    rows = [
        (d.package, d.client, d.scheduler, d.workers_text(), "yes" if d.required else "no")
        for d in differences
    ]
    table = asciitable(["Package", "Client", "Scheduler", "Workers", "Must match"], rows)
    pins = [d.fix() for d in differences if d.fix()]
    lines = [
        f"This client and {where} run different versions of packages that Dask needs to "
        "match; tasks may fail with obscure (un)pickling errors.",
        "",
        table,
        "",
        "To fix it:",
        "  - use the default node environment (environment=None, stack='sync'): it pins Python "
        "and every distribution this client has installed to this client's versions;",
        "  - or pin the client's versions in your own environment (`dask-amlcompute env "
        "--print --format conda` prints them) and pass environment='name@latest';",
    ]
    if pins:
        lines.append(f"  - or match the cluster locally: pip install {' '.join(pins)}.")
    lines.append(
        "Set version_check='warn' (amlcompute.version-check) to go on regardless, "
        "or 'ignore' to skip this check."
    )
    return "\n".join(lines)


async def cluster_versions(
    scheduler_address: str, connection_args: dict | None = None, timeout: float = 30.0
) -> tuple[dict, dict]:
    """The scheduler's and workers' ``get_versions()`` results, through the scheduler.

    Returns
    -------
    tuple
        ``(scheduler, {worker address: versions})``.
    """
    async with rpc(
        scheduler_address, timeout=timeout, connection_args=connection_args or {}
    ) as scheduler:
        own = await scheduler.versions(packages=EXTRA_PACKAGES)
        workers = await scheduler.broadcast(
            msg={"op": "versions", "packages": EXTRA_PACKAGES}, on_error="ignore"
        )
    return own, dict(workers or {})


def apply_policy(differences: list[Difference], policy: str, where: str = "the cluster") -> None:
    """Raise or warn about ``differences`` as ``policy`` says.

    Required packages raise :class:`VersionMismatchError` under ``raise`` and
    warn under ``warn``; optional ones only ever warn. ``ignore`` does nothing.
    """
    validate_policy(policy)
    if policy == "ignore" or not differences:
        return
    message = format_differences(differences, where)
    if policy == "raise" and any(d.required for d in differences):
        err = VersionMismatchError(message)
        err.differences = differences
        raise err
    warnings.warn(message, VersionMismatchWarning, stacklevel=3)


async def check_versions(
    scheduler_address: str,
    connection_args: dict | None = None,
    policy: str = "raise",
    *,
    timeout: float = 30.0,
    client: Mapping[str, Any] | None = None,
) -> None:
    """Compare this client's package versions with the cluster's.

    Parameters
    ----------
    scheduler_address
        The scheduler, as this client reaches it.
    connection_args
        Connection arguments for that address (TLS), as for ``rpc``.
    policy
        ``"raise"``, ``"warn"`` or ``"ignore"`` (setting ``version-check``).
    timeout
        Bound on talking to the scheduler.
    client
        The client's ``get_versions()`` (default: this process's).

    Raises
    ------
    VersionMismatchError
        ``policy="raise"`` and Python, dask, distributed or cloudpickle differ;
        the message has a table of the differences and how to fix them, and
        the exception's ``differences`` attribute lists them.

    Examples
    --------
    >>> await check_versions(cluster.scheduler_address, {}, "raise")  # doctest: +SKIP
    """
    if validate_policy(policy) == "ignore":
        return
    scheduler, workers = await cluster_versions(scheduler_address, connection_args, timeout)
    mine = client if client is not None else get_versions(packages=EXTRA_PACKAGES)
    differences = compare_versions(mine, scheduler, workers)
    if differences:
        logger.info("Version differences with %s: %s", scheduler_address, differences)
    apply_policy(differences, policy, where=f"the cluster at {scheduler_address}")
