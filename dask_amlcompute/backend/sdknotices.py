"""What the SDK prints: no "experimental class" notices, no upload bar, no secrets.

azure-ai-ml's last-resort-printed ``This is an experimental class`` notices (six before any
result) and secrets in request logs (urllib3's ``sig=``, azure-core's network trace) are filtered
by :func:`install_log_filters`. Uploading a code snapshot, the SDK writes a tqdm bar and, whatever
``show_progress`` says, a colour reset to ``sys.stderr``: :func:`without_sdk_output` drops what
the calling thread writes there.
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


def redact(text: str) -> str:
    """Mask (``***``) account keys, SAS signatures, authorizations and private keys."""
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def _no_experimental_notice(record: logging.LogRecord) -> bool:
    """Drop azure-ai-ml's "This is an experimental class/method" notices only."""
    return not any(fragment in record.getMessage() for fragment in NOTICE_FRAGMENTS)


def _redacting(record: logging.LogRecord) -> bool:
    """Rewrite a record whose message holds a secret (see :func:`redact`); drop none."""
    message = record.getMessage()
    if (clean := redact(message)) != message:
        record.msg, record.args = clean, None
    return True


def install_log_filters() -> None:
    """Install both filters on their loggers (idempotent; ``import dask_amlcompute`` does)."""
    logging.getLogger(EXPERIMENTAL_LOGGER).addFilter(_no_experimental_notice)  # adds once
    for name in REDACTED_LOGGERS:
        logging.getLogger(name).addFilter(_redacting)


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
