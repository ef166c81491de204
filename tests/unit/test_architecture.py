"""The layout's rules, checked on the source: no import cycles, the node side stands alone,
only the backend talks to Azure, the emulator is a separate package (see docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dask_amlcompute"
EMULATOR = Path(__file__).resolve().parents[2] / "emulator" / "aml_emulator"
#: Packages allowed to import ``azure``: the client's Azure side.
AZURE_PACKAGES = ("backend",)
#: The library's modules that may import the emulator (commands that start or reach one).
EMULATOR_USERS = (
    "dask_amlcompute.cli.demo",
    "dask_amlcompute.cli.manage",
    "dask_amlcompute.cli.run",
)


def module_name(path: Path) -> str:
    parts = ["dask_amlcompute", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path | None = None) -> set[str]:
    """Every module ``name`` imports, at any depth of its code (lazy imports included)."""
    path = path or MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            # "from pkg import module" imports the module (the package only runs as its parent)
            found.update(submodules if len(submodules) == len(node.names) else {target})
            found.update(submodules)
    return found


def internal_graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        edges = set()
        for target in imports(name):
            # an import of a.b.c reaches the deepest module of ours on that path
            parts = target.split(".")
            for i in range(len(parts), 0, -1):
                if ".".join(parts[:i]) in MODULES:
                    edges.add(".".join(parts[:i]))
                    break
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_package():
    graph = internal_graph()
    assert "dask_amlcompute.backend.state" in graph["dask_amlcompute.backend.jobs"]
    assert "dask_amlcompute.cluster" in graph["dask_amlcompute"]
    # a cycle made on purpose is found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_anywhere():
    graph = internal_graph()
    # the package root re-exports the public names: what it imports may not import it back
    assert cycles(graph) == []
    back = sorted(
        m for m, edges in graph.items() if "dask_amlcompute" in edges and m != "dask_amlcompute"
    )
    assert back == [], f"modules importing the package root: {back}"


def test_only_the_backend_imports_azure():
    offenders = sorted(
        name
        for name in MODULES
        if not name.startswith(tuple(f"dask_amlcompute.{p}" for p in AZURE_PACKAGES))
        and any(t == "azure" or t.startswith("azure.") for t in imports(name))
    )
    assert offenders == []


def test_settings_are_pure():
    """config and validation read no workspace: nothing of backend/, at any depth."""
    graph = internal_graph()
    for name in ("dask_amlcompute.config", "dask_amlcompute.validation"):
        reached, todo = set(), [name]
        while todo:
            for target in graph[todo.pop()] - reached:
                reached.add(target)
                todo.append(target)
        backend = sorted(m for m in reached if m.startswith("dask_amlcompute.backend"))
        assert backend == [], f"{name} imports {backend}"


def test_node_side_imports_only_stdlib_distributed_and_the_protocol():
    node_modules = [m for m in MODULES if m.startswith("dask_amlcompute.node")]
    # exceptions: stdlib only; rank 0 raises the library's ClusterLostError to clients
    allowed = {"dask_amlcompute._protocol", "dask_amlcompute.exceptions", *node_modules}
    for name in node_modules:
        ours = {t for t in internal_graph()[name] if t.startswith("dask_amlcompute")}
        assert ours <= allowed, f"{name} imports {sorted(ours - allowed)}"


@pytest.mark.parametrize("entry", ["dask_amlcompute.node", "dask_amlcompute.node.script"])
def test_node_side_runs_without_azure_asyncssh_or_mlflow(entry):
    # A blocker refuses azure, asyncssh and mlflow as if they were not installed.
    code = textwrap.dedent(
        f"""
        import importlib.abc, runpy, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("azure", "asyncssh", "mlflow"):
                    raise ImportError("not installed here: " + name)
        sys.meta_path.insert(0, Block())
        for name in list(sys.modules):
            if name.split(".")[0] in ("azure", "asyncssh", "mlflow"):
                del sys.modules[name]
        import dask_amlcompute.node.entry, dask_amlcompute.node.plugins, dask_amlcompute.node.script
        # every node and worker process imports the package: never the client side's weight
        light = {{"", "._protocol", "._version", ".backend", ".backend.sdknotices", ".config",
                  ".exceptions", ".validation", ".node", ".node.entry", ".node.plugins",
                  ".node.runtags", ".node.script"}}
        loaded = {{m for m in sys.modules if m.startswith("dask_amlcompute")}}
        assert loaded <= {{"dask_amlcompute" + m for m in light}}, sorted(loaded)
        sys.argv = ["{entry}", "--help"]
        runpy.run_module("{entry}", run_name="__main__")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--role" in proc.stdout


def test_the_emulator_imports_nothing_of_the_library():
    found = {
        path.name: sorted(
            t for t in imports(f"aml_emulator.{path.stem}", path) if "dask_amlcompute" in t
        )
        for path in sorted(EMULATOR.glob("*.py"))
    }
    assert len(found) > 20
    assert {name: ts for name, ts in found.items() if ts} == {}


def test_the_library_works_without_the_emulator():
    users = sorted(m for m in MODULES if any(t.startswith("aml_emulator") for t in imports(m)))
    assert users == list(EMULATOR_USERS)
    # A blocker refuses aml_emulator as if it were not installed: every module imports,
    # and the commands that need it say how to install it.
    code = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "aml_emulator":
                    raise ModuleNotFoundError("No module named " + repr(name), name=name)
        sys.meta_path.insert(0, Block())
        for name in {sorted(m for m in MODULES if not m.endswith("__main__"))!r}:
            importlib.import_module(name)
        from dask_amlcompute.cli import main
        sys.exit(main(["demo"]) + main(["list", "--emulator", "http://127.0.0.1:9"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert proc.stderr.count("pip install -e ./emulator") == 2


def test_test_modules_have_unique_basenames():
    # the README's command collects tests/ and emulator/tests in one run (rootdir imports):
    # two test modules of one basename fail collection with "import file mismatch"
    root = Path(__file__).resolve().parents[2]
    names = [p.name for d in ("tests", "emulator/tests") for p in (root / d).rglob("test_*.py")]
    assert not {n for n in names if names.count(n) > 1}
