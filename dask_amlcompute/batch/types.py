"""The result types of a batch run, shared by the worker and client sides.

Public as :mod:`dask_amlcompute.batch` names: :class:`ItemError`, :class:`BatchStats`,
:class:`BatchResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BatchResult", "BatchStats", "ItemError"]


@dataclass
class ItemError:
    """Why one input failed; stands in place of its result (like ``foreach`` error objects).

    ``index``: the input's position; ``type``, ``message``: the exception's class name
    and text; ``traceback``: from the worker; ``attempts``: runs of the input;
    ``timed_out``: the batch time limit abandoned the call; ``worker``: the address of
    the last attempt's worker; ``exception``: the exception itself if it pickles.
    """

    index: int
    type: str
    message: str
    traceback: str = ""
    attempts: int = 1
    timed_out: bool = False
    worker: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    def reraise(self) -> None:
        """Raise the original exception (or a RuntimeError describing it)."""
        if self.exception is not None:
            raise self.exception
        raise RuntimeError(f"input {self.index} failed: {self.type}: {self.message}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (without the exception object)."""
        return {k: v for k, v in vars(self).items() if k != "exception"}


@dataclass
class BatchStats:
    """Counters of a batch run, updated as batches finish.

    ``done``, ``failed``: inputs with a final outcome; ``retried``: re-runs of failed
    inputs; ``max_in_flight``: the most batches ever submitted at once;
    ``stuck_threads``: abandoned calls still running on the workers at the last report.
    """

    total: int | None = None
    done: int = 0
    failed: int = 0
    timed_out: int = 0
    retried: int = 0
    batches: int = 0
    max_in_flight: int = 0
    stuck_threads: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        """One line: counts and elapsed time."""
        elapsed = time.monotonic() - self.started
        total = f"/{self.total}" if self.total is not None else ""
        text = (
            f"{self.done + self.failed}{total} inputs in {self.batches} batches: "
            f"{self.done} done, {self.failed} failed ({self.timed_out} timed out), "
            f"{self.retried} retried, {elapsed:.1f}s"
        )
        if self.stuck_threads:
            text += f"; {self.stuck_threads} abandoned call(s) still running on workers"
        return text


@dataclass
class BatchResult:
    """One finished mini-batch: input positions and results (values or :class:`ItemError`)."""

    number: int
    indices: list[int]
    results: list[Any]
    path: Path | None = None

    @property
    def errors(self) -> list[ItemError]:
        """The failed inputs of this batch."""
        return [r for r in self.results if isinstance(r, ItemError)]


# Their public home stays dask_amlcompute.batch (which re-exports them): pickles of results
# (output_format="pickle", results sent back from workers), reprs and docs keep naming it.
for _cls in (ItemError, BatchStats, BatchResult):
    _cls.__module__ = "dask_amlcompute.batch"
del _cls
