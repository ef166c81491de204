"""Shipping a folder of the user's modules to the workers (ship_code, and code=)."""

from __future__ import annotations

import importlib
import time
import uuid

import pytest
from _helpers import make_tree
from distributed import Client

from dask_amlcompute import AmlComputeCluster
from dask_amlcompute.code import ship_code


@pytest.mark.slow
def test_task_imports_a_module_from_the_shipped_folder(
    emulator, ml_client, cluster_kwargs, tmp_path, monkeypatch
):
    name = f"shipped_{uuid.uuid4().hex[:8]}"
    root = make_tree(
        tmp_path / "src",
        {
            f"{name}/__init__.py": "from .core import triple\n",
            f"{name}/core.py": "def triple(x):\n    return 3 * x\n",
            f"{name}/data.csv": "ignored",
            ".amlignore": "*.csv\n",
        },
    )
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(name)
    # code= goes into the jobs' code snapshot: the main job's nodes and a worker job's nodes
    # (which reuse the code asset AML registered) import the user's module from their cwd
    snapshot = make_tree(
        tmp_path / "snapshot",
        {
            "mymod.py": "def answer():\n    return 42\n",
            "data.csv": "x\n1\n",
            ".amlignore": "*.csv\n",
        },
    )

    def probe() -> tuple[int, bool, bool]:
        import os

        import mymod

        return mymod.answer(), os.path.exists("mymod.py"), os.path.exists("data.csv")

    with (
        AmlComputeCluster(ml_client, n_nodes=2, code=snapshot, **cluster_kwargs) as cluster,
        Client(cluster) as client,
    ):
        bundle = ship_code(cluster, root)
        assert f"{name}/data.csv" not in bundle.files
        futures = client.map(module.triple, range(10))
        assert client.gather(futures) == [3 * i for i in range(10)]
        where = client.run(lambda: __import__(name).__file__)
        assert len(where) == 2
        for path in where.values():  # the workers' own unpacked copy, not the client's folder
            assert path.endswith(f"src/{name}/__init__.py") and not path.startswith(str(root))

        # a worker that joins later gets the code before it starts
        cluster.scale(3)
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 3:
            assert time.monotonic() < deadline, "the extra worker did not join"
            time.sleep(0.2)
        newest = max(client.scheduler_info()["workers"].values(), key=lambda w: w["name"])
        assert newest["name"].startswith(f"{cluster.name}-w")
        future = client.submit(module.triple, 7, workers=[newest["id"]], pure=False)
        assert future.result(timeout=30) == 21
        results = client.run(probe)
        assert [j for j in cluster.jobs if j != cluster.main_job_name]  # a worker job's node too
    assert len(results) == 3
    assert set(results.values()) == {(42, True, False)}  # the .amlignore rule applied
