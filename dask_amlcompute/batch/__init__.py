"""Batch runs over many inputs: mini-batches, retries, time limits, an error threshold.

On any Dask client; each mini-batch is one Dask task (:mod:`.worker`), an exception
fails only its input. See :func:`map_batches` and :func:`iter_batches`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed import Client, as_completed, get_client
from distributed.deploy import Cluster
from tqdm.auto import tqdm

from ..config import checked
from ..exceptions import ConfigurationError, ErrorThresholdExceededError
from .output import _write_batch
from .types import BatchResult, BatchStats, ItemError
from .worker import _drop_state, _error, _run_batch

__all__ = ["BatchResult", "BatchStats", "ItemError", "iter_batches", "map_batches"]

#: Arguments checked by amlcompute-schema.yaml (``definitions``); _KINDS: the others.
_IN_SCHEMA = ("batch_size", "max_in_flight", "total", "retries", "error_threshold", "timeout",
              "output_dir", "output_format", "progress", "desc")  # fmt: skip
_KINDS: dict[str, tuple[Any, str]] = {
    "fn": (Callable, "callable"),
    "init": (Callable | None, "callable"),
    "inputs": (Iterable, "iterable"),
    "client": (Client | None, "a distributed Client"),
    "cluster": (Cluster | None, "a distributed Cluster"),
}
_PENDING = object()  # the result of an input still running or to be retried


class _Batch:
    """An original mini-batch while its inputs are running or being retried."""

    def __init__(self, number: int, first: int, inputs: list) -> None:
        self.number, self.inputs = number, inputs
        self.indices = list(range(first, first + len(inputs)))
        self.results: list[Any] = [_PENDING] * len(inputs)
        self.attempts = [0] * len(inputs)


def _checked(o: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a batch run, refused if bad before anything is submitted."""
    o |= {name: checked(name, o[name]) for name in _IN_SCHEMA}
    if o["client"] is not None and o["cluster"] is not None:
        raise ConfigurationError("Pass client= or cluster=, not both.")
    for what, (kind, words) in _KINDS.items():
        if not isinstance(o[what], kind):
            raise ConfigurationError(f"{what} must be {words}, got {o[what]!r}.")
    if o["output_dir"] is not None:
        try:  # now: an unwritable folder fails before any batch runs
            Path(o["output_dir"]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"output_dir cannot be created: {exc}") from None
    return o


def _allowed_failures(value: float | None, total: int | None) -> float | None:
    """``error_threshold`` (schema-checked) as a count of failures; None: no limit."""
    if value is None or value == -1:
        return None
    if value < 0 or (value >= 1 and value != int(value)):
        raise ConfigurationError(
            f"error_threshold must be -1 (never stop), a whole count >= 0 or a fraction in "
            f"(0, 1), got {value!r}."
        )
    if 0 < value < 1:
        if total is None:
            raise ConfigurationError(
                "error_threshold as a fraction needs the number of inputs: pass a sized "
                "collection or total=."
            )
        return value * total
    return value


def _sort_into(results: dict, errors: dict, pairs: Iterable[tuple[int, Any]]) -> None:
    """Add (input position, result) ``pairs`` to ``results`` and (ItemErrors) ``errors``."""
    for index, result in pairs:
        (errors if isinstance(result, ItemError) else results)[index] = result


class BatchRun:
    """An iterable batch run; see :func:`iter_batches`. ``stats`` is live while iterating."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.o = o = _checked(arguments)
        sized = o["total"] is None and isinstance(o["inputs"], Sized)
        self.stats = BatchStats(total=len(o["inputs"]) if sized else o["total"])
        self.limit = _allowed_failures(o["error_threshold"], self.stats.total)
        self.files: list[Path] = []
        self.first: tuple[float, str] = (math.inf, "")  # the first failure in input order

    def _client(self) -> tuple[Any, bool]:
        """The Dask client to use, and whether this run opened it (to close it at the end)."""
        client, own = self.o["client"], self.o["cluster"] is not None
        if own:
            client = Client(self.o["cluster"], set_as_default=False)
        elif client is None:
            try:
                client = get_client()
            except ValueError:
                raise ConfigurationError(
                    "No Dask client: pass client= or cluster=, or create a Client first."
                ) from None
        if client.asynchronous:
            raise ConfigurationError("map_batches/iter_batches need a synchronous Dask client.")
        return client, own

    def __iter__(self) -> Iterator[BatchResult]:
        o, stats = self.o, self.stats
        client, own = self._client()
        threads = sum(client.nthreads().values()) or 2
        guess = 100 if stats.total is None else math.ceil(stats.total / (4 * threads))
        size = o["batch_size"] or max(1, min(1000, guess))
        max_in_flight = o["max_in_flight"] or max(2, 2 * threads)
        run_id = uuid.uuid4().hex[:8]
        source = iter(o["inputs"])
        tasks: dict[str, tuple[_Batch, list[int]]] = {}
        retry_q: deque[tuple[_Batch, list[int]]] = deque()
        live: dict[int, _Batch] = {}
        seq, numbers, first = itertools.count(), itertools.count(), 0
        done = as_completed(loop=client.loop)
        bar = tqdm(total=stats.total, desc=o["desc"], unit="item", file=sys.stderr,
                   disable=not o["progress"])  # fmt: skip
        try:
            while True:
                while len(tasks) < max_in_flight:
                    priority = 1  # retries first: their batch is held until they finish
                    if retry_q:
                        batch, positions = retry_q.popleft()
                    elif chunk := list(itertools.islice(source, size)):  # [] once exhausted
                        batch = _Batch(next(numbers), first, chunk)
                        live[batch.number], first = batch, first + len(chunk)
                        positions, priority = list(range(len(chunk))), 0
                    else:
                        break
                    future = client.submit(
                        _run_batch, o["fn"], [batch.inputs[p] for p in positions],
                        o["timeout"], o["init"], f"init-{run_id}",
                        key=f"map_batches-{run_id}-{next(seq)}", priority=priority, pure=False,
                    )  # fmt: skip
                    tasks[future.key] = (batch, positions)
                    done.add(future)
                    stats.max_in_flight = max(stats.max_in_flight, len(tasks))
                if not tasks:
                    break
                future = next(done)
                batch, positions = tasks.pop(future.key)
                again = self._record(batch, positions, future)
                future.release()
                if again:
                    retry_q.append((batch, again))
                bar.set_postfix(failed=stats.failed, retried=stats.retried, refresh=False)
                bar.update(stats.done + stats.failed - bar.n)  # the inputs finished so far
                if self.limit is not None and stats.failed > self.limit:
                    raise self._abort(live)
                if not any(r is _PENDING for r in batch.results):
                    del live[batch.number]
                    yield self._finish(batch)
        finally:
            for future in list(done.futures):
                future.cancel()
            bar.close()  # updated after the last task
            if o["progress"]:
                print(f"{o['desc']}: {stats.summary()}", file=sys.stderr, flush=True)
            if o["init"] is not None:
                with contextlib.suppress(Exception):
                    client.run(_drop_state, f"init-{run_id}")
            if own:
                client.close()

    def _record(self, batch: _Batch, positions: list[int], future: Any) -> list[int]:
        """Store a finished task's outcomes; return the positions to run again."""
        stats, again = self.stats, []
        if future.status == "error":  # the task itself failed (e.g. its worker died)
            err = _error(future.exception())
            err.traceback = "".join(traceback.format_tb(future.traceback()))
            values, errors, not_run = [], dict.fromkeys(range(len(positions)), err), []
        else:
            values, errors, not_run, stats.stuck_threads = future.result()
        for k, pos in enumerate(positions):
            if k in not_run:  # after a hung call: not run yet
                again.append(pos)
                continue
            batch.attempts[pos] += 1
            if k in errors:
                err = replace(errors[k], index=batch.indices[pos], attempts=batch.attempts[pos])
                if batch.attempts[pos] <= self.o["retries"]:
                    stats.retried += 1
                    again.append(pos)
                    continue
                stats.failed += 1
                stats.timed_out += err.timed_out
                self.first = min(self.first, (err.index, f"{err.index}: {err.type}: {err.message}"))
            else:
                stats.done += 1
            batch.results[pos] = err if k in errors else values[k]
        return again

    def _finish(self, batch: _Batch) -> BatchResult:
        self.stats.batches += 1
        result = BatchResult(batch.number, batch.indices, batch.results)
        if self.o["output_dir"] is not None:
            result.path = _write_batch(Path(self.o["output_dir"]), result, self.o["output_format"])
            self.files.append(result.path)
        return result

    def _abort(self, live: dict[int, _Batch]) -> ErrorThresholdExceededError:
        s = self.stats
        exc = ErrorThresholdExceededError(
            f"Stopped: {s.failed} input(s) failed, more than error_threshold="
            f"{self.o['error_threshold']!r} allows ({s.summary()}). First failure: input "
            f"{self.first[1]}. Batches still running were cancelled; completed results are in "
            ".results and per-item errors in .errors.",
            stats=s, files=self.files,
        )  # fmt: skip
        for batch in live.values():
            pairs = zip(batch.indices, batch.results, strict=True)
            _sort_into(exc.results, exc.errors, ((i, r) for i, r in pairs if r is not _PENDING))
        return exc


def iter_batches(
    fn: Callable,
    inputs: Iterable,
    *,
    client: Any = None,
    cluster: Any = None,
    batch_size: int | None = None,
    error_threshold: int | float = -1,
    timeout: str | float | None = None,
    retries: int = 0,
    init: Callable[[], Any] | None = None,
    progress: bool = True,
    output_dir: str | os.PathLike | None = None,
    output_format: str = "auto",
    max_in_flight: int | None = None,
    total: int | None = None,
    desc: str = "map_batches",
) -> BatchRun:
    """Run ``fn`` over ``inputs`` in mini-batches; yield each batch as it finishes.

    Inputs are read lazily, at most ``max_in_flight`` batches at once (bounded
    memory); batches come in completion order, with their input positions.

    Parameters
    ----------
    fn
        Called as ``fn(item)``, or ``fn(item, state)`` when ``init`` is given.
    inputs
        Any iterable (file names, parameter sets, seeds, ...).
    client, cluster
        The Dask client, or a cluster to open one on (closed at the end).
        Default: the current client (``distributed.get_client()``).
    batch_size
        Inputs per batch (one Dask task). Default: about four batches per worker
        thread, from 1 to 1000 (100 when the number of inputs is unknown).
    error_threshold
        Stop, raising :class:`~dask_amlcompute.exceptions.ErrorThresholdExceededError`,
        once more inputs than this failed after retries: a count, a fraction of all
        inputs in (0, 1), or -1 (never stop).
    timeout
        Time limit of one batch (seconds, ``"5m"``; ``init`` not included). The call
        running at the limit is abandoned and fails as timed out; the inputs after it
        run again. Default: no limit.
    retries
        How many times a failed input is run again before it counts as failed.
    init
        Called once per worker before its first batch (load a model); its result is
        passed to ``fn`` and dropped at the end. If it raises, the batch's inputs fail.
    progress
        Show a progress bar (tqdm) with done/failed/retried counts, and a summary.
    output_dir, output_format
        Write each finished batch to a file there (``batch-NNNNNN.json``, or
        ``.parquet`` when every result is a pandas DataFrame and pyarrow is
        installed, its errors in ``.errors.json``; ``output_format``: ``"auto"``,
        ``"json"``, ``"parquet"`` or ``"pickle"``). Yielded batches carry ``path``.
    max_in_flight
        Most batches submitted at once. Default: twice the worker threads.
    total, desc
        Number of inputs when ``inputs`` has no ``len()`` (for the progress bar and
        a fractional ``error_threshold``); label of the progress bar.

    Returns
    -------
    BatchRun
        An iterable of :class:`BatchResult`; ``.stats`` counts live.

    Examples
    --------
    >>> for batch in iter_batches(score, paths, client=client, batch_size=50):  # doctest: +SKIP
    ...     save(batch.indices, batch.results)
    """
    return BatchRun(dict(locals()))  # the arguments by name, checked now


def map_batches(fn: Callable, inputs: Iterable, **options: Any) -> list[Any]:
    """Run ``fn`` over every input in mini-batches; return the results in input order.

    An input that failed (after ``retries``) gets an :class:`ItemError` in place
    of its result, with its exception type, message, traceback and worker.
    ``options``: every keyword of :func:`iter_batches`.

    Returns
    -------
    list
        Results (or :class:`ItemError`) in input order; with ``output_dir``, the
        written files in batch order instead.

    Raises
    ------
    ErrorThresholdExceededError
        More inputs failed than ``error_threshold`` allows. ``.results`` and
        ``.errors`` hold everything that completed, by input position.

    Examples
    --------
    >>> results = map_batches(lambda x: x * x, range(10_000), client=client,
    ...                       retries=2, timeout="5m", error_threshold=0.01)  # doctest: +SKIP
    >>> errors = [r for r in results if isinstance(r, ItemError)]  # doctest: +SKIP

    See Also
    --------
    iter_batches : the streaming form, for results that do not fit in memory.
    """
    run = iter_batches(fn, inputs, **options)
    results: dict[int, Any] = {}
    try:
        for batch in run:
            if batch.path is None:
                results.update(zip(batch.indices, batch.results, strict=True))
    except ErrorThresholdExceededError as exc:
        _sort_into(exc.results, exc.errors, results.items())
        raise
    return sorted(run.files) or [results[i] for i in range(len(results))]  # files: output_dir
