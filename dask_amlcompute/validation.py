"""Checks of user input that a schema cannot say, before anything is submitted to AML.

Durations, memory sizes, pip requirements, environment references; the rest is in
``amlcompute-schema.yaml`` (checked by :mod:`.config`). Each returns the normalised
value or raises :class:`~.exceptions.ConfigurationError`.
"""

from __future__ import annotations

import contextlib
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, cast

import isodate
from dask.utils import parse_bytes, parse_timedelta

from .exceptions import ConfigurationError

#: A clock string, ``[h:]m:s`` (``"1:30:00"``, ``"05:00"``).
_CLOCK = re.compile(r"(?:(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d+(?:\.\d+)?)")
# Registered AML environments: name, then ':version' or '@label' (azure-ai-ml's parsing).
_ENV_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Most Dask workers of one cluster (our bound: far more than one scheduler serves; it keeps
#: the per-worker bookkeeping of a bad count small).
MAX_WORKERS = 100_000
#: Longest duration accepted anywhere (30 days; AML does not let a job live that long).
MAX_DURATION = 30 * 86400.0
#: Prefix of AML's curated environments, resolved by the service (not looked up here).
CURATED_ENV_PREFIX = "AzureML-"


def parse_duration(
    value: str | float | None,
    what: str = "timeout",
    minimum: float = 0.0,
    maximum: float = MAX_DURATION,
) -> float | None:
    """Seconds of ``value`` (None passes), named ``what`` in errors, within the bounds.

    ``value``: seconds, a dask string (``"90s"``, ``"1.5 hours"``), an ISO 8601
    duration (``"PT1H30M"``) or a clock (``"1:30:00"``). Anything else, and
    durations that are not positive or out of bounds, raise ConfigurationError.

    >>> parse_duration("PT1H30M")
    5400.0
    >>> parse_duration("2h")
    7200.0
    """
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_text(value.strip())
    if seconds is None or not (seconds > 0 and minimum <= seconds <= maximum):  # NaN: neither
        raise ConfigurationError(
            f"Invalid {what}: {value!r}. Use a positive duration from {minimum:g} s to "
            f"{timedelta(seconds=maximum)}: seconds, a string such as '90s', '30m' or '2h', an ISO "
            "8601 duration such as 'PT2H', or '1:30:00'."
        )
    return seconds


def _duration_text(text: str) -> float | None:
    """Seconds of a duration string (see :func:`parse_duration`), or None if it is none."""
    if text.upper().startswith("P"):
        try:
            delta = isodate.parse_duration(text.upper())
        except ValueError:  # isodate.ISO8601Error
            return None
        # years and months (an isodate.Duration) have no fixed length in seconds
        return delta.total_seconds() if isinstance(delta, timedelta) else None
    if clock := _CLOCK.fullmatch(text):
        return int(clock["h"] or 0) * 3600 + int(clock["m"]) * 60 + float(clock["s"])
    try:
        return float(parse_timedelta(text))
    except (ValueError, KeyError, TypeError, IndexError, OverflowError):
        return None


def count(value: object, what: str, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool or float) from ``minimum`` to ``maximum``.

    Examples
    --------
    >>> count(3, "n")
    3
    """
    if type(value) is int and value >= minimum and (maximum is None or value <= maximum):
        return value  # (a bool is no int here)
    most = "" if maximum is None else f" and at most {maximum}"
    raise ConfigurationError(f"{what} must be an int of at least {minimum}{most}, got {value!r}.")


def memory_limit(value: object, what: str = "memory_limit") -> str | int | float | None:
    """Check a Dask worker memory limit (``distributed.Nanny``'s); return it unchanged.

    ``"auto"`` or None, bytes (int, or ``"4GiB"``), a fraction of the node's
    memory (``0 < x <= 1``) or 0 for none. Under 1 MiB is refused (a missing unit).

    Examples
    --------
    >>> memory_limit("4GiB")
    '4GiB'
    >>> memory_limit(0.5)
    0.5
    """
    if value is None or value == "auto":
        return cast("str | None", value)  # None or "auto"
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and value.strip():
        for parse in (float, parse_bytes):  # "0.5" is a fraction, "1e9" bytes, as in distributed
            with contextlib.suppress(ValueError, TypeError, OverflowError):
                number = float(parse(value))
                break
    # a fraction, 0, or bytes: under 1 MiB surely lacks a unit, no Azure VM has 64 TiB (NaN: none)
    if number is None or not (0 <= number <= 1 or 2**20 <= number <= 64 * 2**40):
        raise ConfigurationError(
            f"Invalid {what}: {value!r}. Use 'auto', the limit of one worker process from 1 MiB "
            "to 64 TiB such as '4GiB' or '500MB' (or an int number of bytes), a fraction of the "
            "node's memory such as 0.5, or 0 for no per-worker limit."
        )
    assert isinstance(value, str | int | float)  # a number was read from it
    return value


def pip_requirements(value: object, what: str = "pip_packages") -> list[str]:
    """Check pip requirements (PEP 508); URLs, local paths and pip options pass as they are.

    Examples
    --------
    >>> pip_requirements(["scikit-learn>=1.3", "dask[dataframe]"])
    ['scikit-learn>=1.3', 'dask[dataframe]']
    """
    from packaging.requirements import InvalidRequirement, Requirement

    items = list(cast("list[str]", value or []))  # a list of strings (the schema)
    for item in items:
        text = item.strip()
        if "://" in text or text.startswith(("git+", ".", "/", "~", "--")):
            continue
        try:
            Requirement(text)
        except InvalidRequirement as exc:
            first = str(exc).splitlines()[0]
            raise ConfigurationError(
                f"{what}: {item!r} is not a valid pip requirement ({first}). Write it as "
                "pip would, e.g. 'scikit-learn>=1.3' or 'name @ https://.../x.whl'."
            ) from None
    return items


def existing_file(value: object, what: str) -> str | None:
    """Return the ``~``-expanded path of an existing file, or None for None."""
    if value is None:
        return None
    text = str(value)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigurationError(
            f"{what}={text!r}: no such file ({path}). Give the path of an existing file "
            "or leave it unset."
        )
    return str(path)


class EnvironmentRef(NamedTuple):
    """A registered AML environment: ``name:version`` or ``name@label``."""

    name: str
    version: str | None = None
    label: str | None = None


def environment_reference(value: str) -> EnvironmentRef | None:
    """The registered environment an ``environment=`` string names, or None.

    ``[azureml:]name@latest`` or ``[azureml:]name:version``; None for images and
    registry or ARM ids (with ``/``) and curated environments (``AzureML-...``).

    Examples
    --------
    >>> environment_reference("azureml:my-env:3")
    EnvironmentRef(name='my-env', version='3', label=None)
    >>> environment_reference("myacr.azurecr.io/dask:1") is None
    True
    """
    bare = value.strip().removeprefix("azureml:")
    if "/" in bare or bare.startswith(CURATED_ENV_PREFIX):
        return None
    name, at, label = bare.rpartition("@")
    if not at:
        name, colon, version = bare.partition(":")
        ref = EnvironmentRef(name, version) if colon else None
    else:
        ref = EnvironmentRef(name, label=label)
    hint = (
        "Use 'name@latest' or 'name:version' for an environment registered in the workspace, "
        "a Docker image with its registry ('docker.io/library/python:3.11', "
        "'myacr.azurecr.io/dask:1'), an azure.ai.ml Environment, or None for the "
        "pinned default environment."
    )
    if ref is None:
        raise ConfigurationError(f"environment={value!r} names no version: AML needs one. {hint}")
    if not _ENV_NAME.fullmatch(ref.name) or not _ENV_NAME.fullmatch(ref.version or ref.label or ""):
        raise ConfigurationError(f"environment={value!r} is not an environment reference. {hint}")
    if ref.label is not None and ref.label != "latest":
        raise ConfigurationError(
            f"environment={value!r}: only the label 'latest' is supported (azure-ai-ml "
            f"resolves no other). Use '{ref.name}@latest' or '{ref.name}:<version>'."
        )
    return ref


def environment_setting(value: object, what: str = "environment") -> Any:
    """Check the ``environment`` setting (no network: the plan checks it exists).

    ``"azureml:name@latest"`` becomes ``"name@latest"``: azure-ai-ml 1.35 looks the
    label up under the prefixed name and fails.
    """
    if not isinstance(value, str):
        return value  # None, or an Environment: the backend checks it (settings import no azure)
    ref = environment_reference(value)
    return f"{ref.name}@{ref.label}" if ref is not None and ref.label is not None else value
