"""Durations, names and mappings (no network)."""

from __future__ import annotations

import pytest

from dask_amlcompute import ConfigurationError
from dask_amlcompute.validation import aml_name, iso8601_duration, parse_duration


@pytest.mark.parametrize(
    "value, seconds",
    [
        (60, 60.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1.5 hours", 5400.0),
        ("PT1H30M", 5400.0),
        ("pt45s", 45.0),
        ("P1DT1H", 90000.0),
        ("1:30:00", 5400.0),
        ("05:00", 300.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "PT", "P", "-5", 0, -1, "1:xx", True, [1]])
def test_bad_durations_raise(value):
    with pytest.raises(ConfigurationError, match="Invalid job_timeout"):
        parse_duration(value, "job_timeout")


def test_none_passes_through():
    assert parse_duration(None) is None


@pytest.mark.parametrize(
    "seconds, text", [(3600, "PT1H"), (5400, "PT1H30M"), (45, "PT45S"), (3661, "PT1H1M1S")]
)
def test_iso8601_roundtrip(seconds, text):
    assert iso8601_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_aml_names():
    assert aml_name("dask-user_1", "name") == "dask-user_1"
    for bad in ["", "-x", "a b", "x" * 256, "a/b"]:
        with pytest.raises(ConfigurationError):
            aml_name(bad, "name")
