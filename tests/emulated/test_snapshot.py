"""The jobs' code snapshot: what is staged for upload, and how a build failure is explained."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dask_amlcompute import ConfigurationError, __version__
from dask_amlcompute.backend.jobwait import uninstallable_requirements
from dask_amlcompute.backend.snapshot import LIBRARY_DIR, library_files, stage_snapshot


def tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_the_library_travels_without_bytecode(tmp_path):
    staged = stage_snapshot(root=tmp_path)
    files = tree(staged)
    for needed in (
        "dask_amlcompute/__init__.py",
        "dask_amlcompute/_protocol.py",
        "dask_amlcompute/node/entry.py",
        "dask_amlcompute/batch/worker.py",
        "dask_amlcompute/amlcompute.yaml",  # package data the config module reads
    ):
        assert needed in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert len(files) == len(library_files())
    # package metadata, so the nodes' version report finds the snapshot's library
    assert f"dask_amlcompute-{__version__}.dist-info/METADATA" in files
    # byte-identical copies of the installed package
    for rel in ("dask_amlcompute/node/entry.py", "dask_amlcompute/_version.py"):
        source = LIBRARY_DIR / rel.split("/", 1)[1]
        assert (staged / rel).read_bytes() == source.read_bytes()


def test_same_content_same_folder_changed_content_new_folder(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "mylib.py").write_text("X = 1\n")
    first = stage_snapshot(code, root=tmp_path / "cache")
    assert stage_snapshot(code, root=tmp_path / "cache") == first  # AML reuses it by hash
    (code / "mylib.py").write_text("X = 2\n")
    second = stage_snapshot(code, root=tmp_path / "cache")
    assert second != first and (second / "mylib.py").read_text() == "X = 2\n"


def test_user_code_and_library_together_ignore_rules_apply(tmp_path):
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "__init__.py").write_text("")
    (code / "run.py").write_text("print(1)\n")
    (code / "big.csv").write_text("a,b\n")
    (code / ".amlignore").write_text("*.csv\n*/\n")  # "*/" would also drop dask_amlcompute/
    (code / "pkg" / "keep.py").write_text("")
    staged = stage_snapshot(code, root=tmp_path / "cache")
    files = tree(staged)
    assert "run.py" in files and "big.csv" not in files
    assert ".amlignore" not in files  # the SDK would apply it to the library's files too
    assert "dask_amlcompute/node/entry.py" in files


def test_links_out_of_the_code_folder_are_left_out_with_a_warning(tmp_path):
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("private key material: never uploaded\n")
    code = tmp_path / "code"
    (code / "conf").mkdir(parents=True)
    (code / "run.py").write_text("print(1)\n")
    (code / "id_rsa").symlink_to(secret)
    (code / "conf" / "creds").symlink_to(secret)
    (code / "alias.py").symlink_to(code / "run.py")  # inside the folder: shipped
    (code / "home").symlink_to(secret.parent.parent, target_is_directory=True)  # not entered
    with pytest.warns(UserWarning, match="2 symbolic link.*outside it: conf/creds, id_rsa"):
        staged = stage_snapshot(code, root=tmp_path / "cache")
    files = tree(staged)
    assert "run.py" in files and (staged / "alias.py").read_text() == "print(1)\n"
    assert not [f for f in files if "id_rsa" in f or "creds" in f or f.startswith("home/")]
    assert not [p for p in staged.rglob("*") if p.is_file() and "never uploaded" in p.read_text()]


def test_node_package_leaves_the_library_out(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "run.py").write_text("print(1)\n")
    staged = stage_snapshot(code, include_library=False, root=tmp_path / "cache")
    assert tree(staged) == ["run.py"]
    assert stage_snapshot(None, include_library=False, root=tmp_path / "cache") is None


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (
            lambda c: (c / "dask_amlcompute").mkdir() or (c / "dask_amlcompute/x.py").touch(),
            "dask_amlcompute",
        ),
        (lambda c: None, "every file is ignored|Nothing to ship"),
    ],
)
def test_bad_code_folders_are_refused_before_anything_runs(tmp_path, setup, match):
    code = tmp_path / "code"
    code.mkdir()
    setup(code)
    with pytest.raises(ConfigurationError, match=match):
        stage_snapshot(code, root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_the_staged_library_runs_from_the_snapshot_folder(tmp_path):
    # (see also test_node_builds: the same in an isolated environment on the strict emulator)
    # The node command as AML runs it: in the snapshot folder, with -m, nothing installed
    # beyond the environment (here: this interpreter, but with the library hidden).
    staged = stage_snapshot(root=tmp_path)
    code = (
        "import sys, runpy; sys.argv = ['x', '--help']; "
        "runpy.run_module('dask_amlcompute.node', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import dask_amlcompute, sys; print(dask_amlcompute.__file__)"],
        cwd=staged,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == str(staged / "dask_amlcompute" / "__init__.py")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=staged, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--role" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (
            "ERROR: No matching distribution found for dask-amlcompute==0.1.0\n",
            ["dask-amlcompute==0.1.0"],
        ),
        (
            "ERROR: Could not find a version that satisfies the requirement foo>=9 "
            "(from versions: none)\nERROR: No matching distribution found for foo>=9\n",
            ["foo>=9"],
        ),
        (
            "  x No solution found when resolving dependencies:\n"
            "  `-> Because nosuch-pkg was not found in the package registry and you require "
            "nosuch-pkg==0.0.1, we can conclude that your requirements are unsatisfiable.\n",
            ["nosuch-pkg"],
        ),
        (  # uv wraps at the terminal's width (seen under pytest-xdist)
            "  cause: Because nosuch-pkg was\n         not found in the package registry and you "
            "require\n         nosuch-pkg==0.0.1, we can conclude that your\n",
            ["nosuch-pkg"],
        ),
        (
            "ResolvePackageNotFound: \n  - libcxx=4.0.1\n  - python=2.8.1\n\nother\n",
            ["libcxx=4.0.1", "python=2.8.1"],
        ),
        ("Successfully installed six-1.16.0\n", []),
    ],
)
def test_uninstallable_requirements_are_read_from_the_build_log(log, expected):
    assert uninstallable_requirements(log) == expected
