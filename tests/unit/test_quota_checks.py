"""Quota verdicts and price texts, from sizes and usage lines (no workspace)."""

from __future__ import annotations

from dask_amlcompute.backend.capacity import (
    Quota,
    QuotaCheck,
    VmSizeInfo,
    check_quota,
    describe_price,
)


def test_quota_arithmetic():
    lines = [Quota("family", used=8, limit=24), Quota("total", used=8, limit=100)]
    assert check_quota(lines, 16) == QuotaCheck(16)  # fits now
    assert check_quota(lines, 20).full == lines[0]  # fits once 4 vCPUs are released
    assert check_quota(lines, 28).never == lines[0]  # more than the limit itself
    size = VmSizeInfo("Standard_X", "f", 4, prices={"standard": 0.5})
    assert (
        describe_price(size, "dedicated", 3) == "$0.50/h per node, $1.50/h for 3 node(s) (estimate)"
    )
    assert describe_price(size, "low_priority", 3) == "price unknown"  # AML gave no such price
    assert describe_price(None, "dedicated", 3) == "price unknown"
