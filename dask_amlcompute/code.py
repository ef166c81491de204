"""Ship a folder of the user's own modules to the workers.

Tasks calling the user's modules are pickled by reference: the workers must import them.
:func:`ship_code` sends a folder with distributed's ``UploadDirectory`` plugin (unpacked on
``sys.path``, workers restarted; later workers get it before they start). What is sent follows
``.amlignore``, else ``.gitignore`` (as AML's code snapshot), after :data:`DEFAULT_IGNORES`, up
to ``max_bytes``. A cluster's ``code=`` folder travels in the jobs' code snapshot instead
(:mod:`~dask_amlcompute.backend.snapshot`, same rules via :func:`collect_code`).
"""

from __future__ import annotations

import asyncio
import collections
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dask.utils import format_bytes

from .exceptions import ConfigurationError

#: Default bound on the (uncompressed) bytes shipped.
DEFAULT_MAX_BYTES = 50 * 2**20
#: Always ignored, before the ignore file's rules (which may re-include them).
DEFAULT_IGNORES = (".git/", "__pycache__/", "*.py[cod]", ".ipynb_checkpoints/", ".DS_Store")
#: Ignore files looked for in the folder, in order (as AML's code snapshot).
IGNORE_FILES = (".amlignore", ".gitignore")


class IgnoreRules:
    """``.gitignore`` rules (:class:`pathspec.GitIgnoreSpec`) for paths relative to a folder.

    As in git, a file inside an ignored directory cannot be re-included; unlike git, ``!src/``
    also re-includes directories under it. Nested ignore files are not read.

    Examples
    --------
    >>> rules = IgnoreRules(["*.csv", "!keep.csv", "data/"])
    >>> rules.ignored("a/b.csv"), rules.ignored("keep.csv"), rules.ignored("data", is_dir=True)
    (True, False, True)
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        import pathspec  # not at the top: nodes import this module and may not have it

        self.spec = pathspec.GitIgnoreSpec.from_lines(list(patterns))

    def ignored(self, relpath: str, is_dir: bool = False) -> bool:
        """Whether ``relpath`` (``/``-separated, relative to the folder) is ignored."""
        if not is_dir:
            return self.spec.match_file(relpath)
        # A directory: the last pattern that matches it wins (GitIgnoreSpec ranks file
        # matches first, which is right for files only). "dir/**" matches what is inside
        # dir, not dir itself (gitignore(5)), but its pathspec regex matches "dir/".
        ignored = False
        for pattern in self.spec.patterns:
            source = pattern.pattern  # the line it came from (from_lines: str)
            inside_only = isinstance(source, str) and source.rstrip().endswith("/**")
            target = relpath if inside_only else relpath + "/"
            if pattern.include is not None and pattern.match_file(target) is not None:
                ignored = pattern.include
        return ignored


@dataclass(frozen=True)
class CodeBundle:
    """The files of a folder that :func:`ship_code` sends: ``/``-separated, relative, sorted."""

    root: Path
    files: tuple[str, ...]
    total_bytes: int
    ignore_file: Path | None = None


def _ignore_rules(
    root: Path, ignore_file: str | os.PathLike | None
) -> tuple[IgnoreRules, Path | None]:
    """Default rules, then those of ``ignore_file`` (or of the first of :data:`IGNORE_FILES`)."""
    names = (ignore_file,) if ignore_file is not None else IGNORE_FILES
    paths = [root / Path(name).expanduser() for name in names]  # an absolute one: as it is
    found = next((path for path in paths if path.is_file()), None)
    if ignore_file is not None and found is None:
        raise ConfigurationError(f"ignore_file {paths[0]} does not exist.")
    try:
        lines = found.read_text(encoding="utf-8").splitlines() if found else []
    except OSError as exc:
        raise ConfigurationError(f"Cannot read ignore file {found}: {exc}") from None
    return IgnoreRules([*DEFAULT_IGNORES, *lines]), found


def largest_entries(files: Iterable[tuple[str, int]], n: int = 5) -> tuple[int, str]:
    """The total of ``(relative path, size)`` pairs and their ``n`` largest top-level entries."""
    sizes: collections.Counter[str] = collections.Counter()
    for rel, size in files:
        sizes[rel.split("/", 1)[0] + ("/" if "/" in rel else "")] += size
    top = ", ".join(f"{name} ({format_bytes(size)})" for name, size in sizes.most_common(n))
    return sizes.total(), top


def collect_code(
    folder: str | os.PathLike,
    *,
    ignore_file: str | os.PathLike | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> CodeBundle:
    """The files of ``folder`` to ship, after the ignore rules, within ``max_bytes`` (None: any).

    ``ignore_file`` is relative to ``folder``; default ``.amlignore``, else ``.gitignore``. Refused
    (ConfigurationError): no folder, nothing left, or too large (naming the largest entries).
    Links to files outside ``folder`` are left out with a UserWarning.
    """
    if not isinstance(folder, str | os.PathLike):
        raise ConfigurationError(f"code must be a folder (a str or path), got {folder!r}.")
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ConfigurationError(f"Cannot ship code={str(folder)!r}: not a folder.")
    rules, found = _ignore_rules(root, ignore_file)
    files: list[tuple[str, int]] = []
    outside: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):  # links to folders are not entered
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not rules.ignored(prefix + d, is_dir=True))
        for name in filenames:
            rel = prefix + name
            path = Path(dirpath, name)
            if rules.ignored(rel) or not path.is_file():
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                outside.append(rel)
                continue
            files.append((rel, path.stat().st_size))
    if outside:
        warnings.warn(
            f"Not shipping {len(outside)} symbolic link(s) in {root} that point outside it: "
            f"{', '.join(sorted(outside)[:10])}. Their targets (a key or credentials file, "
            "say) would become readable by everyone with access to the workspace; copy a "
            "file into the folder if the nodes need it, or list the link in .amlignore.",
            UserWarning,
            stacklevel=2,
        )
    if not files:
        raise ConfigurationError(f"Nothing to ship from {root}: every file is ignored.")
    total, listing = largest_entries(files)
    if max_bytes is not None and total > max_bytes:
        raise ConfigurationError(
            f"The code in {root} is {format_bytes(total)} ({len(files)} files), over the "
            f"{format_bytes(max_bytes)} limit. Largest entries: {listing}. Add data, outputs and "
            f"environments to {found.name if found else '.amlignore'} (gitignore syntax), move "
            "large data to a datastore, or raise max_bytes."
        )
    return CodeBundle(
        root=root, files=tuple(sorted(r for r, _ in files)), total_bytes=total, ignore_file=found
    )


def ship_code(
    client_or_cluster: Any,
    folder: str | os.PathLike,
    *,
    ignore_file: str | os.PathLike | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Any:
    """Send a folder of the user's modules to every worker, now and future ones.

    The folder is put on the workers' ``sys.path`` (ship ``src/`` to ``import mypkg`` from
    ``src/mypkg/``) and the workers restart to import it, losing their in-memory results: ship
    before computing. Shipping the same folder again replaces the previous copy.

    Parameters
    ----------
    client_or_cluster
        A :class:`distributed.Client` or a running cluster (``AmlComputeCluster``).
    folder
        The folder to ship.
    ignore_file
        Ignore file with ``.gitignore`` syntax; default ``.amlignore``, else ``.gitignore``.
    max_bytes
        Bound on the total size (default 50 MiB); None for no bound.

    Returns
    -------
    CodeBundle
        What was sent (an awaitable of it for asynchronous clients/clusters).

    Raises
    ------
    ConfigurationError
        Missing/empty folder, or more than ``max_bytes``.

    Examples
    --------
    >>> ship_code(client, "src")  # doctest: +SKIP
    >>> client.submit(mypkg.work, 1).result()  # doctest: +SKIP
    """
    from distributed import Client
    from distributed.diagnostics.plugin import UploadDirectory
    from distributed.protocol.pickle import dumps

    is_client = isinstance(client_or_cluster, Client)
    scheduler = client_or_cluster.scheduler if is_client else client_or_cluster.scheduler_comm

    async def ship() -> CodeBundle:  # collecting and zipping off the event loop
        bundle = await asyncio.to_thread(
            collect_code, folder, ignore_file=ignore_file, max_bytes=max_bytes
        )
        keep = {str(bundle.root / rel) for rel in bundle.files}
        skip = (lambda filename: os.path.normpath(filename) not in keep,)
        plugin = await asyncio.to_thread(
            UploadDirectory, str(bundle.root), restart_workers=True, update_path=True,
            skip_words=(), skip=skip,
        )  # fmt: skip
        await scheduler.register_scheduler_plugin(
            plugin=dumps(plugin), name=plugin.name, idempotent=False
        )
        return bundle

    return client_or_cluster.sync(ship)
