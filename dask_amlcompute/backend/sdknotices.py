"""What the SDK logs: no "experimental class" notices, no secrets.

azure-ai-ml logs a warning (through the ``azure.ai.ml._utils._experimental``
logger, which has no handler, so Python's last-resort handler prints it to
stderr) the first time each experimental schema or class is used. Loading the
SDK's job schemas prints six of them (``Class AutoDeleteSettingSchema: This is
an experimental class, and may change at any time...``) before any result,
although nothing the library does is experimental. :class:`ExperimentalNoticeFilter`
drops exactly those records; every other SDK warning still shows.

At DEBUG, urllib3 logs every request line with its query string: the SAS
signature (``sig=``) of the code snapshot's upload URL (write access) among
them; azure-core's network trace (``logging_enable=True``) logs headers and
bodies (bearer tokens, the job body). :class:`SecretRedactingFilter` masks SAS
signatures, account keys, bearer/SharedKey authorizations and PEM private keys
in the records of those loggers (:data:`REDACTED_LOGGERS`).

Uploading a job's code snapshot, the SDK writes a tqdm bar (``Uploading 0ac58...
(0.47 MBs)``) and, whatever ``MLClient(show_progress=...)`` says, a colour reset
(``print(Fore.RESET ...)`` in its blob and gen2 storage clients' ``upload``) to
``sys.stderr``. No parameter of the call turns that off, so
:func:`without_sdk_output` runs the call with ``sys.stderr`` dropping what the
calling thread writes (other threads write through) and puts it back after.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: The logger azure-ai-ml's ``@experimental`` decorator writes to.
EXPERIMENTAL_LOGGER = "azure.ai.ml._utils._experimental"
#: Fragments of the SDK's EXPERIMENTAL_CLASS_MESSAGE / EXPERIMENTAL_METHOD_MESSAGE.
NOTICE_FRAGMENTS = ("This is an experimental class", "This is an experimental method")
#: Loggers that write request URLs, headers or bodies: urllib3's request lines, azure-core's
#: HTTP logging policy and its network trace (a logger filter sees only its own records).
REDACTED_LOGGERS = (
    "urllib3.connectionpool",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.core.pipeline.policies._universal",
)
#: Secrets in text, each as (prefix kept)(secret masked).
SECRET_PATTERNS = (
    re.compile(r"(?i)(AccountKey=)[^;\s'\"]+"),
    re.compile(r"(?i)(SharedAccessSignature=)[^;\s'\"]+"),
    re.compile(r"(?i)([?&;]sig=)[^&;\s'\"]+"),
    re.compile(r"(?i)((?:Bearer|SharedKey [^:\s'\"]+:)\s*)[^\s'\",]+"),
    re.compile(r"(-----BEGIN [A-Z ]*PRIVATE KEY-----).*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
)


def redact(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Mask account keys, SAS signatures, authorizations, private keys and given values.

    Parameters
    ----------
    text
        Any text (an error message, a repr, a log line).
    secrets
        Literal secret values to mask wherever they occur.

    Returns
    -------
    str
        The text with secrets replaced by ``***``.
    """
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


class ExperimentalNoticeFilter(logging.Filter):
    """Drop azure-ai-ml's "This is an experimental class/method" notices only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in NOTICE_FRAGMENTS)


class SecretRedactingFilter(logging.Filter):
    """Rewrite a record whose message holds a secret (see :func:`redact`); drop none."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filters() -> None:
    """Install both filters on their loggers (idempotent).

    Importing :mod:`dask_amlcompute` does this; azure itself is not imported.
    """
    wanted: list[tuple[str, type[logging.Filter]]] = [
        (EXPERIMENTAL_LOGGER, ExperimentalNoticeFilter),
        *((name, SecretRedactingFilter) for name in REDACTED_LOGGERS),
    ]
    for name, kind in wanted:
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


class _ThreadMutedStream:
    """``sys.stderr`` while SDK calls run: drops what their threads (``muted``) write."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.muted: set[int] = set()

    def write(self, text: str) -> int:
        return len(text) if threading.get_ident() in self.muted else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


_stderr_lock = threading.Lock()


def without_sdk_output(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, run with what it writes to ``sys.stderr`` from its own thread dropped."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        with _stderr_lock:
            if not isinstance(sys.stderr, _ThreadMutedStream):
                sys.stderr = _ThreadMutedStream(sys.stderr)
            proxy = sys.stderr
            proxy.muted.add(threading.get_ident())
        try:
            return fn(*args, **kwargs)
        finally:
            with _stderr_lock:
                proxy.muted.discard(threading.get_ident())
                if not proxy.muted and sys.stderr is proxy:
                    sys.stderr = proxy.stream

    return call
