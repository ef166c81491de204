"""Version check between client, scheduler and workers."""

from __future__ import annotations

import os

import cloudpickle
import dask
import pytest
from distributed.versions import VersionMismatchWarning, get_versions

from dask_amlcompute import AmlComputeCluster, VersionMismatchError
from dask_amlcompute.backend.versions import (
    EXTRA_PACKAGES,
    check_versions,
)


def test_check_versions_against_an_in_process_scheduler():
    import asyncio

    from distributed import Scheduler, Worker

    async def run():
        async with (
            Scheduler(dashboard_address=":0") as s,
            Worker(s.address, nthreads=1, dashboard_address=":0"),
        ):
            await check_versions(s.address, {}, "raise")
            mine = get_versions(packages=EXTRA_PACKAGES)
            changed = {**mine, "packages": {**mine["packages"], "distributed": "1.0.0"}}
            with pytest.raises(VersionMismatchError, match="distributed"):
                await check_versions(s.address, {}, "raise", client=changed)

    asyncio.run(asyncio.wait_for(run(), 60))


def fake_version_env(tmp_path, package: str, version: str, rank: int) -> dict[str, str]:
    """Node env vars making ``package`` report ``version`` on node ``rank`` only.

    A ``sitecustomize`` on PYTHONPATH puts a directory with a fake ``.dist-info``
    first on ``sys.path`` when ``NODE_RANK`` matches: ``importlib.metadata`` (which
    distributed's version report reads) then finds the fake version. The code
    itself is unchanged; only this test's nodes see it.
    """
    fake = tmp_path / "fake-dist" / f"{package}-{version}.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('NODE_RANK') == os.environ.get('FAKE_VERSION_RANK'):\n"
        "    sys.path.insert(0, os.environ['FAKE_VERSION_DIR'])\n"
    )
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {
        "PYTHONPATH": pythonpath,
        "FAKE_VERSION_RANK": str(rank),
        "FAKE_VERSION_DIR": str(tmp_path / "fake-dist"),
    }


@pytest.mark.slow
def test_mismatched_worker_on_the_emulator(emulator, ml_client, cluster_kwargs, tmp_path):
    env_vars = fake_version_env(tmp_path, "cloudpickle", "0.0.1", rank=1)
    # the cluster checks versions as its workers join: the default policy refuses to start
    with pytest.raises(VersionMismatchError, match="cloudpickle"):
        AmlComputeCluster(
            ml_client, n_nodes=2, env_vars=env_vars, name="mismatch-raise", **cluster_kwargs
        )
    assert emulator.wait_job("mismatch-raise-main", timeout=30) in ("Completed", "Canceled")

    cluster_kwargs = {**cluster_kwargs, "version_check": "ignore"}
    with AmlComputeCluster(ml_client, n_nodes=2, env_vars=env_vars, **cluster_kwargs) as cluster:
        address = cluster.scheduler_address
        with pytest.raises(VersionMismatchError) as info:
            cluster.sync(check_versions, address, {}, "raise")
        message = str(info.value)
        assert "cloudpickle" in message
        assert cloudpickle.__version__ in message  # the client's (and the scheduler's)
        assert "0.0.1 (1 worker)" in message  # the odd worker
        assert "pip install" not in message  # no single cluster version to install
        [diff] = info.value.differences
        assert diff.client == cloudpickle.__version__
        assert sorted(diff.workers.values()) == sorted(["0.0.1", cloudpickle.__version__])

        with pytest.warns(VersionMismatchWarning, match="cloudpickle"):
            cluster.sync(check_versions, address, {}, "warn")
        cluster.sync(check_versions, address, {}, "ignore")

        # the emulator says what the default environment installed
        job = cluster.main_job_name
        log = emulator.node_log(job, 0)
        assert "[emulator] pip requirements:" in log
        assert f"dask=={dask.__version__}" in log
        recorded = ml_client.jobs.get(job).properties["emulator.environment"]
        assert f"cloudpickle=={cloudpickle.__version__}" in recorded
