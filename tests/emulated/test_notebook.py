"""The notebooks run top to bottom against the emulator (so they cannot rot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _helpers import foreign_lines

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("quickstart.ipynb", ["nodes in use: 0"]),
        ("batch.ipynb", ["5000 results, 10 errors", "True batch time limit", "nodes in use: 0"]),
        ("datastores.ipynb", ["rows: 200000 summary matches: True", "nodes in use: 0"]),
        (
            "capacity.ipynb",
            ["$0.76/h for 4 node(s)", "332833500", "compute deleted: True", "nodes in use: 0"],
        ),
    ],
)
def test_notebook_executes(name, expected, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel must be this interpreter (the one with the project installed), whatever
    # kernels the machine has: a kernelspec in JUPYTER_PATH wins over the user's own
    # (~/.local/share/jupyter), which may point at another venv.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "Python 3 (tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    for text in expected:
        assert text in outputs
    if name == "quickstart.ipynb":  # printed: the library's progress and the results only
        streams = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        text = "".join(o["text"] for o in streams if o.get("output_type") == "stream")
        allowed = (r"AML jobs: \{.+\}", r"Dashboard: \S+", r"nodes in use: 0")
        foreign = foreign_lines(text, *allowed)
        assert not foreign, "\n".join(map(repr, foreign))
