"""Version check: client vs scheduler vs workers (as ``Client.get_versions`` asks them).

Different Python (major.minor), dask, distributed or cloudpickle fail later with obscure
(un)pickling errors: a difference raises :class:`~dask_amlcompute.exceptions.VersionMismatchError`
(or warns) with a table and a fix.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distributed.core import rpc
from distributed.utils import asciitable
from distributed.versions import VersionMismatchWarning, get_versions

from ..exceptions import VersionMismatchError

#: Must match: a difference raises (policy ``raise``).
REQUIRED = ("python", "dask", "distributed", "cloudpickle")
#: Should match: a difference always only warns (if the client has the package).
OPTIONAL = ("msgpack", "numpy", "pandas", "pyarrow", "dask-amlcompute")
MISSING = "MISSING"

#: Packages asked of every process beyond distributed's default list.
EXTRA_PACKAGES = ["pyarrow", "dask-amlcompute"]


@dataclass(frozen=True)
class Difference:
    """One package (``python``: the interpreter) whose versions differ (``MISSING``: absent)."""

    package: str
    client: str
    scheduler: str
    workers: Mapping[str, str]  # worker address -> version
    required: bool  # must match (an error), else a warning

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


def _packages(info: Mapping[str, Any]) -> dict[str, str]:
    """The package dict of a ``get_versions()`` result (None values: ``MISSING``)."""
    return {k: MISSING if v is None else str(v) for k, v in info["packages"].items()}


def _cut(package: str, version: str, parts: int) -> str:
    """Python's version cut to ``parts`` (2: compared, 3: shown); others as they are."""
    return ".".join(version.split(".")[:parts]) if package == "python" else version


def compare_versions(
    client: Mapping[str, Any], scheduler: Mapping[str, Any], workers: Mapping[str, Any]
) -> list[Difference]:
    """The packages whose versions differ: required ones first, then optional ones the client has.

    ``client``, ``scheduler`` and the ``workers`` by address are ``get_versions()`` results;
    workers that did not answer (None) are left out.
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
        if len({_cut(package, v, 2) for v in (mine, sched, *theirs.values())}) > 1:
            shown = {a: _cut(package, v, 3) for a, v in theirs.items()}
            cut = _cut(package, mine, 3), _cut(package, sched, 3)
            out.append(Difference(package, *cut, shown, required))
    return out


def format_differences(differences: list[Difference], where: str = "the cluster") -> str:
    """A readable report: a table of the differences and how to fix them."""
    rows = [
        (d.package, d.client, d.scheduler, d.workers_text(), "yes" if d.required else "no")
        for d in differences
    ]
    table = asciitable(["Package", "Client", "Scheduler", "Workers", "Must match"], rows)
    pins = " ".join(d.fix() for d in differences if d.fix())
    return (
        f"This client and {where} run different versions of packages that Dask needs to "
        f"match; tasks may fail with obscure (un)pickling errors.\n\n{table}\n\nTo fix it:\n"
        "  - use the default node environment (environment=None, stack='sync'): it pins Python "
        "and every distribution this client has installed to this client's versions;\n"
        "  - or pin the client's versions in your own environment (`dask-amlcompute env "
        "--print --format conda` prints them) and pass environment='name@latest';\n"
        + (f"  - or match the cluster locally: pip install {pins}.\n" if pins else "")
        + "Set version_check='warn' (amlcompute.version-check) to go on regardless, "
        "or 'ignore' to skip this check."
    )


def apply_policy(differences: list[Difference], policy: str, where: str = "the cluster") -> None:
    """Raise (``raise``, required packages) or warn about ``differences``; ``ignore``: nothing."""
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
    """Compare this client's package versions with the cluster's, as ``policy`` says.

    Parameters
    ----------
    scheduler_address, connection_args
        The scheduler as this client reaches it, and the ``rpc`` connection arguments (TLS).
    policy
        ``"raise"``, ``"warn"`` or ``"ignore"`` (setting ``version-check``).
    timeout, client
        Bound on talking to the scheduler; the client's ``get_versions()`` (default: this one's).

    Raises
    ------
    VersionMismatchError
        ``policy="raise"`` and Python, dask, distributed or cloudpickle differ; its
        ``differences`` attribute lists them.
    """
    if policy == "ignore":
        return
    async with rpc(scheduler_address, timeout=timeout, connection_args=connection_args or {}) as s:
        scheduler = await s.versions(packages=EXTRA_PACKAGES)
        msg = {"op": "versions", "packages": EXTRA_PACKAGES}
        workers = await s.broadcast(msg=msg, on_error="ignore") or {}
    mine = client if client is not None else get_versions(packages=EXTRA_PACKAGES)
    differences = compare_versions(mine, scheduler, workers)
    apply_policy(differences, policy, where=f"the cluster at {scheduler_address}")
