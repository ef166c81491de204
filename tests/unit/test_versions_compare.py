"""Comparing the versions of client, scheduler and workers, and the version_check policies."""

from __future__ import annotations

import warnings

import pytest
from distributed.versions import VersionMismatchWarning

from dask_amlcompute import VersionMismatchError
from dask_amlcompute.backend.versions import apply_policy, compare_versions, format_differences


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
