"""Validation of user input before anything is submitted to AML.

Each function returns the normalised value or raises
:class:`~dask_amlcompute.exceptions.ConfigurationError` naming the bad value
and the accepted forms.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, cast

import isodate
from dask.utils import parse_bytes, parse_timedelta

from .exceptions import ConfigurationError

#: A clock string, ``[h:]m:s`` (``"1:30:00"``, ``"05:00"``).
_CLOCK = re.compile(r"^(?:(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d+(?:\.\d+)?)$")
# AML job and experiment names: letters, digits, '-' and '_', starting with a letter or digit.
_AML_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
# POSIX portable environment variable names (what a shell can export).
_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Registered AML environments: name, then ':version' or '@label' (azure-ai-ml's parsing).
_ENV_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_ENV_VERSION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: Byte sizes below this are refused as memory limits (surely a missing unit).
_MIN_MEMORY_LIMIT = 2**20
#: Prefix of AML's curated environments, resolved by the service (not looked up here).
CURATED_ENV_PREFIX = "AzureML-"


def parse_duration(value: str | float | int | None, what: str = "timeout") -> float | None:
    """Parse a duration into seconds.

    Parameters
    ----------
    value
        Seconds as a number, a dask-style string (``"90s"``, ``"2h"``, ``"1.5 hours"``,
        see :func:`dask.utils.parse_timedelta`), an ISO 8601 duration (``"PT1H30M"``,
        read by :func:`isodate.parse_duration`) or a clock string (``"1:30:00"``).
        ``None`` passes through.
    what
        Name of the setting, used in the error message.

    Returns
    -------
    float or None
        Seconds.

    Raises
    ------
    ConfigurationError
        Anything else, and durations that are not positive (``"PT"``, ``0``).

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
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_text(value.strip())
    if seconds is None or not seconds > 0:  # NaN is not > 0 either
        raise ConfigurationError(
            f"Invalid {what}: {value!r}. Use a positive number of seconds, a string such as "
            f"'90s', '30m' or '2h', an ISO 8601 duration such as 'PT2H', or '1:30:00'."
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
    if clock := _CLOCK.match(text):
        return int(clock["h"] or 0) * 3600 + int(clock["m"]) * 60 + float(clock["s"])
    try:
        return float(parse_timedelta(text))
    except (ValueError, KeyError, TypeError, IndexError):
        return None


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


def string_mapping(
    value: Mapping | None, what: str, example: str = "{'team': 'data'}"
) -> dict[str, str]:
    """Check a mapping of strings to strings (AML job tags).

    Parameters
    ----------
    value
        The mapping; None is an empty one.
    what
        Name of the setting, used in the error message.
    example
        A valid value, shown in the error message.

    Returns
    -------
    dict
        A copy of ``value``.

    Raises
    ------
    ConfigurationError
        ``value`` is not a mapping, a key is not a non-empty string, or a value
        is not a string (values are not converted: ``{"n": 1}`` is refused).
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{what} must be a mapping of strings to strings, got {type(value).__name__} "
            f"{value!r}. Pass e.g. {what}={example}."
        )
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigurationError(
                f"{what}: keys must be non-empty strings, got {key!r}. Use a string key."
            )
        if not isinstance(val, str):
            raise ConfigurationError(
                f"{what}[{key!r}] must be a string, got {type(val).__name__} {val!r}. "
                f"Pass it as a string, e.g. {what}={{{key!r}: {str(val)!r}}}."
            )
        out[key] = val
    return out


def env_var_mapping(value: Mapping | None, what: str = "env_vars") -> dict[str, str]:
    """Check environment variables for the nodes: portable names, string values.

    Parameters
    ----------
    value
        Mapping of variable name to value; None is an empty one.
    what
        Name of the setting, used in the error message.

    Returns
    -------
    dict
        A copy of ``value``.

    Raises
    ------
    ConfigurationError
        A name does not match ``[A-Za-z_][A-Za-z0-9_]*`` (e.g. ``"BAD NAME"``,
        ``"A=B"``) or a value is not a string.

    Examples
    --------
    >>> env_var_mapping({"OMP_NUM_THREADS": "1"})
    {'OMP_NUM_THREADS': '1'}
    """
    checked = string_mapping(value, what, example="{'OMP_NUM_THREADS': '1'}")
    for key in checked:
        if not _ENV_VAR_NAME.match(key):
            raise ConfigurationError(
                f"{what}: {key!r} is not a valid environment variable name. Names use "
                "letters, digits and '_' and do not start with a digit "
                "([A-Za-z_][A-Za-z0-9_]*); rename it."
            )
    return checked


def boolean(value: object, what: str) -> bool:
    """Return ``value`` if it is True or False; anything else (``"no"``, 0, None) is refused.

    Examples
    --------
    >>> boolean(False, "quiet")
    False
    """
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"{what} must be True or False, got {type(value).__name__} {value!r}."
        )
    return value


def port(value: object, what: str) -> int:
    """Return ``value`` if it is a TCP port number (an int 0..65535, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigurationError(
            f"{what} must be a port number (an integer from 0 to 65535), got {value!r}."
        )
    return value


def memory_limit(value: object, what: str = "memory_limit") -> str | int | float | None:
    """Check a Dask worker memory limit, with the semantics of ``distributed``.

    Parameters
    ----------
    value
        ``"auto"`` (split the node's memory between its worker processes); None
        (same as ``"auto"`` on the nodes); a number of bytes (int, or a string
        such as ``"4GiB"`` or ``"500 MB"``, see :func:`dask.utils.parse_bytes`);
        a fraction of the node's memory ``0 < x <= 1`` (float, or its string);
        0 for no limit, as in ``distributed.Nanny``. Sizes under 1 MiB are
        refused: they are a missing unit, not a usable limit.
    what
        Name of the setting, used in the error message.

    Returns
    -------
    str, int, float or None
        ``value`` unchanged: the nodes pass it to ``distributed``.

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
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and value.strip():
        try:
            number = float(value)  # "0.5" is a fraction, "1e9" bytes, as in distributed
        except ValueError:
            try:
                number = float(parse_bytes(value))
            except (ValueError, TypeError):
                number = None
    if number is None or not math.isfinite(number) or number < 0:
        raise ConfigurationError(
            f"Invalid {what}: {value!r}. Use 'auto', a size such as '4GiB' or '500MB' "
            "(or an int number of bytes), a fraction of the node's memory such as 0.5, "
            "or 0 for no per-worker limit."
        )
    if 1 < number < _MIN_MEMORY_LIMIT:
        raise ConfigurationError(
            f"{what}={value!r} is {int(number)} bytes per worker: workers that small pause "
            "or die as soon as they start. Give a unit ('4GiB', '500MB') or a fraction of "
            "the node's memory such as 0.5."
        )
    assert isinstance(value, str | int | float)  # a number was read from it
    return value


def string_list(value: object, what: str) -> list[str]:
    """Check a list (or tuple) of non-empty strings; a bare string is refused.

    Examples
    --------
    >>> string_list(("gcc",), "conda_packages")
    ['gcc']
    """
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list | tuple):
        hint = f" Use a list: {what}=[{value!r}]." if isinstance(value, str) else ""
        raise ConfigurationError(
            f"{what} must be a list of strings, got {type(value).__name__} {value!r}.{hint}"
        )
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigurationError(
                f"{what}: every entry must be a non-empty string, got {item!r}. "
                "Remove it or write the package as text."
            )
    return list(value)


def pip_requirements(value: object, what: str = "pip_packages") -> list[str]:
    """Check pip requirements: a list of PEP 508 requirements.

    Direct references pip understands without a name (``git+https://...``,
    ``https://.../x.whl``, a local path starting with ``.``, ``/`` or ``~``) and
    pip options (``--extra-index-url ...``) are accepted as they are.

    Examples
    --------
    >>> pip_requirements(["scikit-learn>=1.3", "dask[dataframe]"])
    ['scikit-learn>=1.3', 'dask[dataframe]']
    """
    from packaging.requirements import InvalidRequirement, Requirement

    items = string_list(value, what)
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


def optional_string(value: object, what: str, allow_path: bool = False) -> str | None:
    """Return ``value`` as a non-empty string, or None; ``allow_path`` takes ``os.PathLike`` too."""
    if value is None:
        return None
    if allow_path and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string or path" if allow_path else "a non-empty string"
        raise ConfigurationError(f"{what} must be {kind} or None, got {value!r}.")
    return value


def existing_file(value: object, what: str) -> str | None:
    """Return the ``~``-expanded path of an existing file, or None for None.

    Raises
    ------
    ConfigurationError
        ``value`` is not a path, or no file is there.
    """
    text = optional_string(value, what, allow_path=True)
    if text is None:
        return None
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigurationError(
            f"{what}={text!r}: no such file ({path}). Give the path of an existing file "
            "or leave it unset."
        )
    return str(path)


def options_mapping(value: object, what: str) -> dict[str, Any]:
    """Check Dask keyword arguments for the nodes: a dict with string keys and JSON values.

    The options reach the nodes as JSON on the job's command line, so every
    value must survive ``json.dumps``.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{what} must be a dict of keyword arguments, got {type(value).__name__} {value!r}."
        )
    for key, val in value.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigurationError(
                f"{what}: keys must be keyword argument names (strings), got {key!r}."
            )
        try:
            json.dumps(val, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{what}[{key!r}] = {val!r} cannot travel to the nodes ({exc}): options are "
                "sent as JSON; use strings, numbers, booleans, None, lists and dicts."
            ) from None
    return dict(value)


class EnvironmentRef(NamedTuple):
    """A registered AML environment named by a string setting.

    Attributes
    ----------
    name
        Environment name (without ``azureml:``).
    version
        Version for ``name:version``, else None.
    label
        Label for ``name@label`` (only ``latest``), else None.
    """

    name: str
    version: str | None = None
    label: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.label}" if self.label else f"{self.name}:{self.version}"


def environment_reference(value: str) -> EnvironmentRef | None:
    """Parse an ``environment=`` string naming a registered workspace environment.

    Parameters
    ----------
    value
        ``"name@latest"``, ``"name:version"``, ``"azureml:name:version"`` or
        ``"azureml:name@latest"``.

    Returns
    -------
    EnvironmentRef or None
        None for what is not looked up in the workspace: Docker images and
        registry or ARM ids (they contain ``/``) and curated environments
        (``AzureML-...``, resolved by the service).

    Raises
    ------
    ConfigurationError
        The string names an environment without a version or label, a label
        other than ``latest``, or has characters AML names cannot have.

    Examples
    --------
    >>> environment_reference("azureml:my-env:3")
    EnvironmentRef(name='my-env', version='3', label=None)
    >>> environment_reference("myacr.azurecr.io/dask:1") is None
    True
    """
    text = value.strip()
    if "/" in text:
        return None
    bare = text[len("azureml:") :] if text.startswith("azureml:") else text
    if bare.startswith(CURATED_ENV_PREFIX):
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
    if not _ENV_NAME.match(ref.name) or not _ENV_VERSION.match(ref.version or ref.label or ""):
        raise ConfigurationError(f"environment={value!r} is not an environment reference. {hint}")
    if ref.label is not None and ref.label != "latest":
        raise ConfigurationError(
            f"environment={value!r}: only the label 'latest' is supported (azure-ai-ml "
            f"resolves no other). Use '{ref.name}@latest' or '{ref.name}:<version>'."
        )
    return ref


def environment_setting(value: object) -> Any:
    """Check the ``environment`` setting (no network: existence is checked before submit).

    Parameters
    ----------
    value
        None (the pinned default), a non-empty string (see
        :func:`environment_reference`; anything with ``/`` is a Docker image or
        registry id), or an ``azure.ai.ml.entities.Environment``.

    Returns
    -------
    Any
        ``value``; ``"azureml:name@latest"`` becomes ``"name@latest"``, which
        azure-ai-ml resolves (1.35 looks up the label under the prefixed name
        and fails).

    Raises
    ------
    ConfigurationError
        Any other value.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip() or value != value.strip() or any(c.isspace() for c in value):
            raise ConfigurationError(
                f"environment must be a non-empty string without spaces, got {value!r}."
            )
        ref = environment_reference(value)
        if ref is not None and ref.label is not None:
            return str(ref)
        return value
    from .backend.environment import is_environment_entity

    if is_environment_entity(value):
        return value
    raise ConfigurationError(
        f"environment must be None, a string ('name@latest', 'name:version', a Docker image) "
        f"or an azure.ai.ml.entities.Environment, got {type(value).__name__} {value!r}."
    )


def vm_size_name(value: object, what: str) -> str:
    """Return ``value`` if it has the form of an Azure VM size name (``Standard_D4s_v3``)."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{1,63}", value):
        raise ConfigurationError(
            f"{what} must be a VM size name like 'Standard_D4s_v3', got {value!r}."
        )
    return value
