"""Keep azure-ai-ml's "experimental class" notices off the user's screen.

azure-ai-ml logs a warning (through the ``azure.ai.ml._utils._experimental``
logger, which has no handler, so Python's last-resort handler prints it to
stderr) the first time each experimental schema or class is used. Loading the
SDK's job schemas prints six of them (``Class AutoDeleteSettingSchema: This is
an experimental class, and may change at any time...``) before any result,
although nothing the library does is experimental. :func:`quiet_experimental_notices`
drops exactly those records; every other SDK warning still shows.
"""

from __future__ import annotations

import logging

#: The logger azure-ai-ml's ``@experimental`` decorator writes to.
EXPERIMENTAL_LOGGER = "azure.ai.ml._utils._experimental"
#: Fragments of the SDK's EXPERIMENTAL_CLASS_MESSAGE / EXPERIMENTAL_METHOD_MESSAGE.
NOTICE_FRAGMENTS = ("This is an experimental class", "This is an experimental method")


class ExperimentalNoticeFilter(logging.Filter):
    """Drop azure-ai-ml's "This is an experimental class/method" notices only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in NOTICE_FRAGMENTS)


def quiet_experimental_notices() -> None:
    """Install :class:`ExperimentalNoticeFilter` on the SDK's notice logger (idempotent).

    Importing :mod:`dask_amlcompute` does this; azure itself is not imported.
    """
    logger = logging.getLogger(EXPERIMENTAL_LOGGER)
    if not any(isinstance(f, ExperimentalNoticeFilter) for f in logger.filters):
        logger.addFilter(ExperimentalNoticeFilter())
