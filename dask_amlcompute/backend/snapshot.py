"""The jobs' code snapshot: how dask-amlcompute itself (and the user's code) reaches the nodes.

No package index has dask-amlcompute, so every job carries the library's files in its code
snapshot (``command(code=<folder>)``: azure-ai-ml uploads the folder, AML keeps it by content
hash and starts each node in a copy of it; ray-on-aml ships its entry script the same way).
A user's ``code=`` folder goes into the same snapshot, its files at the top and the library
under ``dask_amlcompute/``. The folder is staged in the user cache, named by its content
hash, so repeated clusters hand the SDK an identical folder and AML reuses the upload. With
``node_package=`` the snapshot carries only the user's code, or there is none. See
docs/environment.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from ..config import cache_dir
from ..exceptions import ConfigurationError

#: The package folder that travels (``dask_amlcompute/`` inside the snapshot).
LIBRARY_DIR = Path(__file__).resolve().parent.parent
#: Staged snapshots unused for this long are deleted when a new one is staged.
PRUNE_AFTER_SECONDS = 7 * 24 * 3600
#: Ignore files are not copied: the SDK would apply them to the staged folder too, and a
#: user's pattern could then drop the library's files.
_NOT_STAGED = frozenset({".amlignore", ".gitignore"})


#: A file of the snapshot: its path there, and its source file or its content.
SnapshotFile = tuple[str, "Path | bytes"]


def library_metadata() -> SnapshotFile:
    """A ``.dist-info`` for the snapshot's copy of the library (on the nodes' ``sys.path``).

    With it ``importlib.metadata.version("dask-amlcompute")`` (distributed's version report)
    finds the library on a node as it would an installed one.
    """
    from .._version import __version__

    text = f"Metadata-Version: 2.1\nName: dask-amlcompute\nVersion: {__version__}\n"
    return (f"dask_amlcompute-{__version__}.dist-info/METADATA", text.encode())


def library_files() -> list[SnapshotFile]:
    """The package's files but bytecode, and :func:`library_metadata`: ``(path, source)``."""
    found: list[SnapshotFile] = [library_metadata()]
    for dirpath, dirnames, filenames in os.walk(LIBRARY_DIR):
        rel_dir = Path(dirpath).relative_to(LIBRARY_DIR)
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(f for f in filenames if not f.endswith((".pyc", ".pyo"))):
            rel = (Path(LIBRARY_DIR.name) / rel_dir / name).as_posix()
            found.append((rel, Path(dirpath, name)))
    return found


def _user_files(code: str | os.PathLike) -> list[SnapshotFile]:
    from ..code import collect_code

    bundle = collect_code(code)  # .amlignore/.gitignore rules and the size bound
    clash = [
        rel
        for rel in bundle.files
        if rel.split("/", 1)[0] == LIBRARY_DIR.name or rel.startswith("dask_amlcompute-")
    ]
    if clash:
        raise ConfigurationError(
            f"The code folder {bundle.root} has {clash[0]!r}: the snapshot puts dask-amlcompute "
            f"there. Rename that folder, or ship the library with node_package= instead."
        )
    return [(rel, bundle.root / rel) for rel in bundle.files if rel not in _NOT_STAGED]


def _content_hash(files: Iterable[SnapshotFile]) -> str:
    digest = hashlib.sha256()
    for rel, source in files:
        digest.update(rel.encode() + b"\0")
        digest.update(source if isinstance(source, bytes) else source.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def _prune(root: Path, keep: Path) -> None:
    cutoff = time.time() - PRUNE_AFTER_SECONDS
    for entry in root.iterdir():
        try:
            if entry != keep and entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def stage_snapshot(
    code: str | os.PathLike | None = None,
    *,
    include_library: bool = True,
    root: Path | None = None,
) -> Path | None:
    """Stage the folder that becomes the jobs' code snapshot.

    Parameters
    ----------
    code
        The user's code folder (its ``.amlignore``/``.gitignore`` rules apply),
        or None.
    include_library
        Put the library's files under ``dask_amlcompute/`` (False when
        ``node_package`` installs it).
    root
        Where staged snapshots are kept; default ``<cache>/snapshots``.

    Returns
    -------
    pathlib.Path or None
        The staged folder (named by its content hash, reused when it exists), or
        None when there is nothing to ship.

    Raises
    ------
    ConfigurationError
        The code folder is missing, empty, too large or has a ``dask_amlcompute`` entry.
    """
    files = _user_files(code) if code is not None else []
    if include_library:
        files += library_files()
    if not files:
        return None
    files.sort(key=lambda item: item[0])
    root = root or cache_dir() / "snapshots"
    target = root / _content_hash(files)
    if target.is_dir():
        os.utime(target)  # recently used: not pruned
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        for rel, source in files:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                dest.write_bytes(source)
            else:
                shutil.copyfile(source, dest)
        try:
            staging.rename(target)
        except OSError:  # staged concurrently by another process: same content, use theirs
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune(root, target)
    return target
