"""Version check between client, scheduler and workers."""

from __future__ import annotations

import os
import warnings

import cloudpickle
import dask
import pytest
from distributed.versions import VersionMismatchWarning, get_versions

from dask_amlcompute import AmlComputeCluster, ConfigurationError, VersionMismatchError
from dask_amlcompute.backend.versions import (
    EXTRA_PACKAGES,
    apply_policy,
    check_versions,
    compare_versions,
    format_differences,
)


def versions(**packages):
    base = {"python": "3.11.7.final.0", "dask": "1", "distributed": "1", "cloudpickle": "3"}
    base.update(packages)
    return {"packages": {k: v for k, v in base.items() if v is not ...}}


def test_identical_versions_have_no_differences():
    v = versions(numpy="2.0")
    assert compare_versions(v, v, {"w1": v, "w2": v}) == []


def test_python_is_compared_on_major_minor():
    assert compare_versions(versions(), versions(python="3.11.9.final.0"), {}) == []
    [diff] = compare_versions(versions(), versions(), {"w": versions(python="3.10.4.final.0")})
    assert (diff.package, diff.client, diff.workers_text(), diff.required) == (
        "python",
        "3.11.7",
        "3.10.4",
        True,
    )


def test_required_and_optional_differences():
    client = versions(numpy="2.0", pandas="2.2")
    workers = {
        "tcp://a:1": versions(cloudpickle="2", numpy="1.26", pandas="2.2"),
        "tcp://b:1": versions(numpy="2.0", pandas=None),
        "tcp://c:1": None,  # did not answer: left out
    }
    diffs = {d.package: d for d in compare_versions(client, versions(numpy="2.0"), workers)}
    assert set(diffs) == {"cloudpickle", "numpy", "pandas"}
    assert diffs["cloudpickle"].required and not diffs["numpy"].required
    assert diffs["cloudpickle"].workers_text() == "2 (1 worker), 3 (1 worker)"
    assert diffs["pandas"].scheduler == "MISSING"
    # a package the client does not have is not compared
    assert compare_versions(versions(), versions(), {"w": versions(numpy="1")}) == []


def test_report_has_a_table_and_the_fix():
    diffs = compare_versions(
        versions(), versions(cloudpickle="2"), {"w": versions(cloudpickle="2")}
    )
    text = format_differences(diffs)
    assert "| cloudpickle | 3      | 2         | 2       | yes" in text
    assert "pip install cloudpickle==2" in text
    assert "environment=None" in text and "version_check='warn'" in text


def test_policies():
    required = compare_versions(versions(), versions(dask="2"), {})
    optional = compare_versions(versions(numpy="2"), versions(numpy="1"), {})
    with pytest.raises(VersionMismatchError, match="dask") as info:
        apply_policy(required, "raise")
    assert [d.package for d in info.value.differences] == ["dask"]
    with pytest.warns(VersionMismatchWarning, match="dask"):
        apply_policy(required, "warn")
    with pytest.warns(VersionMismatchWarning, match="numpy"):
        apply_policy(optional, "raise")  # optional packages only ever warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_policy(required, "ignore")
        apply_policy([], "raise")
    with pytest.raises(ConfigurationError, match="version_check"):
        apply_policy(required, "explode")


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
