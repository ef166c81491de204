"""Validation of user input before anything is submitted to AML.

Each function returns the normalised value or raises
:class:`~dask_amlcompute.exceptions.ConfigurationError` naming the bad value
and the accepted forms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dask.utils import parse_timedelta

from .exceptions import ConfigurationError

_ISO_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)
_CLOCK = re.compile(r"^(?:(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d+(?:\.\d+)?)$")
# AML job and experiment names: letters, digits, '-' and '_', starting with a letter or digit.
_AML_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")


def parse_duration(value: str | float | int | None, what: str = "timeout") -> float | None:
    """Parse a duration into seconds.

    Parameters
    ----------
    value
        Seconds as a number, a dask-style string (``"90s"``, ``"2h"``, ``"1.5 hours"``),
        an ISO 8601 duration (``"PT1H30M"``) or a clock string (``"1:30:00"``).
        ``None`` passes through.
    what
        Name of the setting, used in the error message.

    Returns
    -------
    float or None
        Seconds.

    Examples
    --------
    >>> parse_duration("PT1H30M")
    5400.0
    >>> parse_duration("2h")
    7200.0
    """
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        iso = _ISO_DURATION.match(text.upper())
        clock = _CLOCK.match(text)
        if iso and text.upper() not in ("P", "PT"):
            parts = {k: float(v) for k, v in iso.groupdict().items() if v}
            seconds = (
                parts.get("days", 0) * 86400
                + parts.get("hours", 0) * 3600
                + parts.get("minutes", 0) * 60
                + parts.get("seconds", 0)
            )
        elif clock:
            seconds = int(clock["h"] or 0) * 3600 + int(clock["m"]) * 60 + float(clock["s"])
        else:
            try:
                seconds = float(parse_timedelta(text))
            except (ValueError, KeyError, TypeError, IndexError):
                seconds = None
    if seconds is None or seconds != seconds or seconds <= 0:
        raise ConfigurationError(
            f"Invalid {what}: {value!r}. Use a positive number of seconds, a string such as "
            f"'90s', '30m' or '2h', an ISO 8601 duration such as 'PT2H', or '1:30:00'."
        )
    return seconds


def iso8601_duration(seconds: float) -> str:
    """Format seconds as the ISO 8601 duration AML uses for ``limits.timeout``.

    Examples
    --------
    >>> iso8601_duration(5400)
    'PT1H30M'
    """
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    out = "PT"
    if hours:
        out += f"{hours}H"
    if minutes:
        out += f"{minutes}M"
    if secs or out == "PT":
        out += f"{secs}S"
    return out


def positive_int(value: object, what: str) -> int:
    """Return ``value`` as an int >= 1 or raise a ConfigurationError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a positive integer, got {value!r}.")
    return value


def aml_name(value: str, what: str) -> str:
    """Check an AML job or experiment name (letters, digits, '-', '_'; max 255)."""
    if not isinstance(value, str) or not _AML_NAME.match(value):
        raise ConfigurationError(
            f"Invalid {what} {value!r}: AML names use letters, digits, '-' and '_', start "
            "with a letter or digit and are at most 255 characters."
        )
    return value


def string_mapping(value: Mapping | None, what: str) -> dict[str, str]:
    """Check a mapping of strings to strings (tags, environment variables)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{what} must be a mapping of strings, got {type(value).__name__}."
        )
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"{what}: keys must be non-empty strings, got {key!r}.")
        out[key] = str(val)
    return out
