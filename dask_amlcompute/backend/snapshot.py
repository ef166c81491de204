"""The jobs' code snapshot: how dask-amlcompute itself (and the user's code) reaches the nodes.

No package index has dask-amlcompute, so every job's code snapshot (``command(code=<folder>)``)
carries it, beside the user's ``code=`` folder and local pure-Python distributions (``"sync"``).
The folder is staged in the user cache by content hash, so AML reuses the upload.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from dask.utils import format_bytes

from ..code import collect_code, largest_entries
from ..config import cache_dir
from ..exceptions import ConfigurationError

#: The package folder that travels (``dask_amlcompute/`` inside the snapshot).
LIBRARY_DIR = Path(__file__).resolve().parent.parent
#: Staged snapshots unused for this long are deleted when a new one is staged.
PRUNE_AFTER_SECONDS = 7 * 24 * 3600
#: Not copied: the SDK would apply them to the staged folder, maybe dropping the library's files.
_NOT_STAGED = frozenset({".amlignore", ".gitignore"})
#: AML's limit on a code snapshot: "The storage limit for experiment snapshots is 300 MB"
#: (learn.microsoft.com/azure/machine-learning/how-to-save-write-experiment-files).
SNAPSHOT_LIMIT = 300 * 2**20


#: A file of the snapshot: its path there, and its source file or its content.
SnapshotFile = tuple[str, "Path | bytes"]


def dist_metadata(name: str, version: str) -> SnapshotFile:
    """A ``.dist-info`` for a distribution the snapshot carries (the nodes' version reports)."""
    text = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    return (f"{name.replace('-', '_')}-{version}.dist-info/METADATA", text.encode())


def distribution_files(dist: importlib.metadata.Distribution) -> list[SnapshotFile]:
    """A local distribution's top-level packages and modules, from where the client imports them.

    They are in ``top_level.txt``, else its RECORD and its ``.pth`` folders (editable installs).
    """
    tops = set((dist.read_text("top_level.txt") or "").split())
    for file in [] if tops else dist.files or ():
        if file.suffix == ".pth":
            folders = Path(str(dist.locate_file(file))).read_text().splitlines()
            tops |= {p.stem for f in folders if Path(f).is_dir() for p in Path(f).iterdir()
                     if p.suffix == ".py" or (p / "__init__.py").is_file()}  # fmt: skip
        elif not file.parts[0].endswith((".dist-info", ".data", "..", "__pycache__")):
            tops.add(file.parts[0].removesuffix(".py"))
    found = [dist_metadata(dist.metadata["Name"], dist.version)]
    for top in sorted(tops - {"setup", "conftest", "tests", "test"}):
        spec = importlib.util.find_spec(top)
        for place in (spec and spec.submodule_search_locations) or ():
            found += _tree(Path(place), top)
        if spec and not spec.submodule_search_locations and Path(spec.origin or "").is_file():
            found.append((Path(str(spec.origin)).name, Path(str(spec.origin))))
    return found


def _tree(folder: Path, prefix: str) -> list[SnapshotFile]:
    """A folder's files (bytecode caches left out) as ``(prefix/relative path, source)``."""
    rels = (path.relative_to(folder) for path in sorted(folder.rglob("*")) if path.is_file())
    return [
        (f"{prefix}/{rel.as_posix()}", folder / rel)
        for rel in rels
        if "__pycache__" not in rel.parts and rel.suffix not in (".pyc", ".pyo")
    ]


def library_files() -> list[SnapshotFile]:
    """The library's files (package data too, no bytecode) and :func:`dist_metadata`."""
    from .._version import __version__

    return [dist_metadata("dask-amlcompute", __version__), *_tree(LIBRARY_DIR, LIBRARY_DIR.name)]


def _user_files(code: str | os.PathLike) -> list[SnapshotFile]:
    bundle = collect_code(code)  # .amlignore/.gitignore rules and the size bound
    tops = sorted({rel.split("/")[0] for rel in bundle.files})
    if clash := [t for t in tops if t == LIBRARY_DIR.name or t.startswith("dask_amlcompute-")]:
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
    packages: Iterable[SnapshotFile] = (),
) -> Path | None:
    """Stage the folder that becomes the jobs' code snapshot (None: nothing to ship).

    Parameters
    ----------
    code
        The user's code folder (its ``.amlignore``/``.gitignore`` rules apply), or None.
    include_library
        Put the library's files under ``dask_amlcompute/`` (not when ``node_package`` does).
    root
        Where staged snapshots are kept, by content hash; default ``<cache>/snapshots``.
    packages
        Files of local distributions (``environment.local_packages``).

    Raises
    ------
    ConfigurationError
        A missing, empty or too large code folder, one with ``dask_amlcompute``, or a snapshot
        over :data:`SNAPSHOT_LIMIT`.
    """
    files = _user_files(code) if code is not None else []
    files += [*(library_files() if include_library else []), *packages]
    if not files:
        return None
    sizes = (
        (rel, len(src) if isinstance(src, bytes) else src.stat().st_size) for rel, src in files
    )
    total, largest = largest_entries(sizes, 3)
    if total > SNAPSHOT_LIMIT:
        raise ConfigurationError(
            f"The jobs' code snapshot would be {format_bytes(total)}, over AML's limit "
            f"of {format_bytes(SNAPSHOT_LIMIT)}. Largest: {largest}. Give large local "
            "distributions a requirement (pip_packages=) or an environment=, use "
            "stack='installed', or keep data out of code=. Nothing was submitted."
        )
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
