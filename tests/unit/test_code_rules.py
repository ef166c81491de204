"""Which files of a code folder are shipped: gitignore rules, defaults, limits."""

from __future__ import annotations

import pytest
from _helpers import make_tree

from dask_amlcompute import ConfigurationError
from dask_amlcompute.code import IgnoreRules, collect_code


@pytest.mark.parametrize(
    "patterns, path, is_dir, ignored",
    [
        (["*.csv"], "a/b/c.csv", False, True),
        (["*.csv", "!keep.csv"], "keep.csv", False, False),
        (["*.csv", "!keep.csv"], "sub/keep.csv", False, False),
        (["data/"], "data", True, True),
        (["data/"], "data", False, False),  # dir-only pattern, a file named data
        (["data/"], "src/data", True, True),  # no slash inside: any depth
        (["/build"], "build", True, True),
        (["/build"], "src/build", True, False),  # anchored
        (["docs/*.md"], "docs/a.md", False, True),
        (["docs/*.md"], "docs/x/a.md", False, False),  # * stops at /
        (["**/tmp"], "a/b/tmp", True, True),
        (["logs/**"], "logs/a/b.txt", False, True),
        (["a/**/z.py"], "a/z.py", False, True),
        (["a/**/z.py"], "a/b/c/z.py", False, True),
        (["file?.py"], "file1.py", False, True),
        (["file[0-9].py"], "filex.py", False, False),
        (["# comment", "", "  "], "# comment", False, False),
        (["\\#hash"], "#hash", False, True),
        (["data/"], "data/x.csv", False, True),  # under an ignored directory
        (["*.log", "!important.log", "important.log"], "important.log", False, True),  # last wins
        (["*", "!*/", "!*.py"], "src/a.py", False, False),  # "only Python files"
        (["*", "!*/", "!*.py"], "src/a.txt", False, True),
        (["*", "!*/", "!*.py"], "src", True, False),
        (["logs/**", "!logs/.gitkeep"], "logs", True, False),  # dir/** is what is inside dir
        (["logs/**", "!logs/.gitkeep"], "logs/sub", True, True),
        (["logs/**", "!logs/.gitkeep"], "logs/.gitkeep", False, False),
        (["logs/**", "!logs/.gitkeep"], "logs/a.log", False, True),
    ],
)
def test_gitignore_semantics(patterns, path, is_dir, ignored):
    assert IgnoreRules(patterns).ignored(path, is_dir=is_dir) is ignored


def test_ignore_file_rules_and_defaults(tmp_path):
    root = make_tree(
        tmp_path / "proj",
        {
            "pkg/__init__.py": "",
            "pkg/mod.py": "X = 1\n",
            "pkg/__pycache__/mod.cpython-311.pyc": "junk",
            ".git/HEAD": "ref",
            "data/big.csv": "1,2\n",
            "data/schema.csv": "a,b\n",
            "notes.txt": "hi",
            ".gitignore": "*.txt\n",
            ".amlignore": "data/\n!data/schema.csv\n*.log\n",
            "run.log": "x",
        },
    )
    bundle = collect_code(root)
    # .amlignore wins over .gitignore (as AML's snapshot); a file in an ignored dir stays out
    assert bundle.ignore_file == root / ".amlignore"
    assert bundle.files == (
        ".amlignore",
        ".gitignore",
        "notes.txt",
        "pkg/__init__.py",
        "pkg/mod.py",
    )
    assert bundle.total_bytes == sum((root / f).stat().st_size for f in bundle.files)
    # an explicit ignore file, relative to the folder
    assert "notes.txt" not in collect_code(root, ignore_file=".gitignore").files
    with pytest.raises(ConfigurationError, match="does not exist"):
        collect_code(root, ignore_file="nope")


def test_negation_keeps_only_what_is_re_included(tmp_path):
    root = make_tree(
        tmp_path / "proj",
        {
            ".amlignore": "*\n!*/\n!*.py\n",
            "pkg/mod.py": "X = 1\n",
            "pkg/notes.md": "x",
            "pkg/sub/deep.py": "",
            "top.py": "",
            "data.csv": "1\n",
        },
    )
    assert collect_code(root).files == ("pkg/mod.py", "pkg/sub/deep.py", "top.py")
    (root / ".amlignore").write_text("pkg/**\n!pkg/mod.py\n")  # contents, not the folder
    assert collect_code(root).files == (".amlignore", "data.csv", "pkg/mod.py", "top.py")


def test_size_limit_is_a_clear_error(tmp_path):
    root = make_tree(tmp_path / "proj", {"mod.py": "X = 1\n", "data/blob.bin": "x" * 5000})
    with pytest.raises(ConfigurationError) as info:
        collect_code(root, max_bytes=1000)
    message = str(info.value)
    assert "over the 0.98 kiB limit" in message
    assert "data/ (4.88 kiB)" in message  # names the largest entry
    assert ".amlignore" in message and "max_bytes" in message
    (root / ".amlignore").write_text("data/\n")
    assert collect_code(root, max_bytes=1000).files == (".amlignore", "mod.py")
    assert collect_code(root, max_bytes=None, ignore_file=None)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(ConfigurationError, match="not a folder"):
        collect_code(tmp_path / "absent")
    make_tree(tmp_path / "empty", {".amlignore": "*\n"})
    with pytest.raises(ConfigurationError, match="every file is ignored"):
        collect_code(tmp_path / "empty")
