"""Batch runs over many inputs: mini-batches, retries, time limits, an error threshold.

What AML's ParallelRunStep and R's ``foreach`` gave their users, on any Dask
client (an :class:`~dask_amlcompute.AmlComputeCluster`, a ``LocalCluster``, ...):

* :func:`map_batches` runs ``fn`` over every input and returns the results in
  input order, with an :class:`ItemError` in place of each input that failed;
* :func:`iter_batches` yields finished mini-batches as they complete, keeping at
  most ``max_in_flight`` batches submitted, so memory stays bounded.

Each mini-batch is one Dask task calling ``fn`` on its inputs one by one; an
exception fails only its own input. A batch time limit (``timeout``) abandons a
hung call (its thread is interrupted at its next Python instruction; one blocked
in C code is counted in :attr:`BatchStats.stuck_threads`) and resubmits the inputs
after it. This is the client side; the worker side is :mod:`.worker`.
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

from tqdm.auto import tqdm

from ..exceptions import ConfigurationError, ErrorThresholdExceededError
from ..validation import count, parse_duration
from .output import _write_batch
from .types import BatchResult, BatchStats, ItemError
from .worker import _drop_state, _error, _run_batch

__all__ = ["BatchResult", "BatchStats", "ItemError", "iter_batches", "map_batches"]


class _Progress:
    """A tqdm bar with done/failed/retried counts, then a one-line summary."""

    def __init__(self, stats: BatchStats, enabled: bool, desc: str) -> None:
        self.stats, self.desc = stats, desc
        self.bar = tqdm(
            total=stats.total, desc=desc, unit="item", file=sys.stderr, disable=not enabled
        )

    def update(self) -> None:
        s = self.stats
        self.bar.set_postfix(failed=s.failed, retried=s.retried, refresh=False)
        self.bar.update(s.done + s.failed - self.bar.n)

    def close(self) -> None:
        if self.bar.disable:
            return
        self.update()
        self.bar.close()
        print(f"{self.desc}: {self.stats.summary()}", file=sys.stderr, flush=True)


class _Batch:
    """An original mini-batch while its inputs are running or being retried."""

    def __init__(self, number: int, first: int, inputs: list) -> None:
        self.number = number
        self.indices = list(range(first, first + len(inputs)))
        self.inputs = inputs
        self.results: list[Any] = [None] * len(inputs)
        self.final = [False] * len(inputs)
        self.attempts = [0] * len(inputs)
        self.remaining = len(inputs)


def _check_threshold(value: int | float | None, total: int | None) -> int | float | None:
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigurationError(
            f"error_threshold must be -1 (never stop), a count >= 0 or a fraction in (0, 1), "
            f"got {value!r}."
        )
    if isinstance(value, float) and 0 < value < 1:
        if total is None:
            raise ConfigurationError(
                "error_threshold as a fraction needs the number of inputs: pass a sized "
                "collection or total=."
            )
        return value * total
    if value != int(value):
        raise ConfigurationError(f"error_threshold {value!r}: a count must be a whole number.")
    return int(value)


#: Formats of the files ``output_dir`` gets.
OUTPUT_FORMATS = ("auto", "json", "parquet", "pickle")


def _check_options(fn: Any, o: dict[str, Any]) -> None:
    """Refuse bad options of a batch run before anything is submitted."""
    for what, value in (("fn", fn), ("init", o["init"] or fn)):
        if not callable(value):
            raise ConfigurationError(f"{what} must be callable, got {value!r}.")
    for what, low, high in (
        ("batch_size", 1, 10**6),
        ("max_in_flight", 1, 10**5),
        ("total", 0, None),
    ):
        if o[what] is not None:
            count(o[what], what, low, high)
    count(o["retries"], "retries", 0, 100)
    if o["output_format"] not in OUTPUT_FORMATS:
        raise ConfigurationError(
            f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {o['output_format']!r}."
        )
    if not isinstance(o["progress"], bool) or not isinstance(o["desc"], str):
        raise ConfigurationError("progress must be True or False and desc a string.")
    if o["client"] is not None and o["cluster"] is not None:
        raise ConfigurationError("Pass client= or cluster=, not both.")
    from distributed import Client
    from distributed.deploy import Cluster

    for what, kind in (("client", Client), ("cluster", Cluster)):
        if o[what] is not None and not isinstance(o[what], kind):
            raise ConfigurationError(
                f"{what} must be a distributed {kind.__name__}, got {o[what]!r}."
            )


def _output_dir(value: Any) -> Path | None:
    """``output_dir`` as a Path, created now: an unwritable folder fails before any batch runs."""
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ConfigurationError(f"output_dir must be a folder path, got {value!r}.")
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"output_dir={str(path)!r} cannot be created: {exc}") from None
    return path


class BatchRun:
    """An iterable batch run; see :func:`iter_batches`. ``stats`` is live while iterating."""

    def __init__(self, fn: Callable, inputs: Iterable, **options: Any) -> None:
        _check_options(fn, options)
        if not isinstance(inputs, Iterable):
            raise ConfigurationError(f"inputs must be iterable, got {type(inputs).__name__}.")
        self.fn, self.inputs, self.o = fn, inputs, options
        total = options["total"]
        if total is None and isinstance(inputs, Sized):
            total = len(inputs)
        self.stats = BatchStats(total=total)
        self.limit = _check_threshold(options["error_threshold"], total)
        self.timeout = parse_duration(options["timeout"], "timeout")
        self.out_dir = _output_dir(options["output_dir"])
        self.files: list[Path] = []
        self.first_error: ItemError | None = None

    def __iter__(self) -> Iterator[BatchResult]:
        from distributed import Client, as_completed, get_client

        o, stats = self.o, self.stats
        client, own = o["client"], False
        if client is None and o["cluster"] is not None:
            client, own = Client(o["cluster"], set_as_default=False), True
        elif client is None:
            try:
                client = get_client()
            except ValueError:
                raise ConfigurationError(
                    "No Dask client: pass client= or cluster=, or create a Client first."
                ) from None
        if client.asynchronous:
            raise ConfigurationError("map_batches/iter_batches need a synchronous Dask client.")
        threads = sum(client.nthreads().values()) or 2
        size = o["batch_size"]
        if size is None:
            size = 100 if stats.total is None else math.ceil(stats.total / (4 * threads))
            size = max(1, min(1000, size))
        max_in_flight = o["max_in_flight"] or max(2, 2 * threads)
        run_id = uuid.uuid4().hex[:8]
        source = iter(self.inputs)
        tasks: dict[str, tuple[_Batch, list[int]]] = {}
        retry_q: deque[tuple[_Batch, list[int]]] = deque()
        live: dict[int, _Batch] = {}
        seq, numbers, first, exhausted = itertools.count(), itertools.count(), 0, False
        done = as_completed(loop=client.loop)
        progress = _Progress(stats, o["progress"], o["desc"])
        try:
            while True:
                while len(tasks) < max_in_flight:
                    priority = 1
                    if retry_q:
                        batch, positions = retry_q.popleft()
                    elif not exhausted:
                        chunk = list(itertools.islice(source, size))
                        if not chunk:
                            exhausted = True
                            continue
                        batch = _Batch(next(numbers), first, chunk)
                        first += len(chunk)
                        live[batch.number] = batch
                        positions, priority = list(range(len(chunk))), 0
                    else:
                        break
                    future = client.submit(
                        _run_batch, self.fn, [batch.inputs[p] for p in positions],
                        self.timeout, o["init"], f"init-{run_id}",
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
                progress.update()
                if self.limit is not None and stats.failed > self.limit:
                    raise self._abort(live)
                if batch.remaining == 0:
                    del live[batch.number]
                    yield self._finish(batch)
        finally:
            for future in list(done.futures):
                future.cancel()
            progress.close()
            if o["init"] is not None:
                with contextlib.suppress(Exception):
                    client.run(_drop_state, f"init-{run_id}")
            if own:
                client.close()

    def _record(self, batch: _Batch, positions: list[int], future: Any) -> list[int]:
        """Store a finished task's outcomes; return the positions to run again."""
        stats, again = self.stats, []
        if future.status == "error":
            task_error = _error(future.exception())
            task_error.traceback = "".join(traceback.format_tb(future.traceback()))
            failed = dict.fromkeys(range(len(positions)), task_error)
            outcome: tuple = ([None] * len(positions), failed, [], None, 0)
        else:
            outcome = future.result()
        values, errors, not_run, _, stats.stuck_threads = outcome
        skipped = set(not_run)
        for k, pos in enumerate(positions):
            if k in skipped:
                again.append(pos)
                continue
            batch.attempts[pos] += 1
            if k not in errors:
                batch.results[pos], batch.final[pos] = values[k], True
                batch.remaining -= 1
                stats.done += 1
                continue
            err = replace(errors[k])
            err.index, err.attempts = batch.indices[pos], batch.attempts[pos]
            if batch.attempts[pos] <= self.o["retries"]:
                stats.retried += 1
                again.append(pos)
                continue
            batch.results[pos], batch.final[pos] = err, True
            batch.remaining -= 1
            stats.failed += 1
            stats.timed_out += err.timed_out
            # the first failure in input order (batches finish in any order)
            if self.first_error is None or err.index < self.first_error.index:
                self.first_error = err
        return again

    def _finish(self, batch: _Batch) -> BatchResult:
        self.stats.batches += 1
        result = BatchResult(batch.number, batch.indices, batch.results)
        if self.out_dir is not None:
            result.path = _write_batch(self.out_dir, result, self.o["output_format"])
            self.files.append(result.path)
        return result

    def _abort(self, live: dict[int, _Batch]) -> ErrorThresholdExceededError:
        results: dict[int, Any] = {}
        errors: dict[int, ItemError] = {}
        for batch in live.values():
            for pos, index in enumerate(batch.indices):
                if batch.final[pos]:
                    target = errors if isinstance(batch.results[pos], ItemError) else results
                    target[index] = batch.results[pos]
        first = self.first_error
        s = self.stats
        cause = ""
        if first is not None:
            cause = f" First failure: input {first.index}: {first.type}: {first.message}."
        return ErrorThresholdExceededError(
            f"Stopped: {s.failed} input(s) failed, more than error_threshold="
            f"{self.o['error_threshold']!r} allows ({s.summary()}).{cause} Batches still "
            "running were cancelled; completed results are in .results and per-item errors "
            "in .errors.",
            results=results, errors=errors, stats=s, files=self.files,
        )  # fmt: skip


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
        The Dask client to use, or a cluster to open a client on (closed at the
        end). Default: the current client (``distributed.get_client()``).
    batch_size
        Inputs per batch (one Dask task). Default: about four batches per worker
        thread, between 1 and 1000 (100 when the number of inputs is unknown).
    error_threshold
        Stop once more inputs than this have failed for good (after retries): a
        count, a fraction of all inputs in (0, 1), or -1 to never stop. Stopping
        raises :class:`~dask_amlcompute.exceptions.ErrorThresholdExceededError`.
    timeout
        Time limit of one batch (seconds, ``"90s"``, ``"5m"``). The call running
        when it expires is abandoned and fails as timed out; the inputs after it
        are resubmitted. ``init`` is not under the limit. Default: no limit.
    retries
        How many times a failed input is run again before it counts as failed.
    init
        Called once per worker, before its first batch, for expensive setup (load
        a model); its return value is passed to ``fn`` and dropped at the end. An
        exception fails the batch's inputs (init is tried again next batch).
    progress
        Show a progress bar (tqdm) with done/failed/retried counts, and a summary.
    output_dir
        Write each finished batch to a file there (``batch-NNNNNN.json``, or
        ``.parquet`` when every result of the batch is a pandas DataFrame and
        pyarrow is installed; a batch's errors then go to ``.errors.json``). The
        yielded batches carry ``path``.
    output_format
        ``"auto"``, ``"json"``, ``"parquet"`` or ``"pickle"``.
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
    return BatchRun(
        fn, inputs, client=client, cluster=cluster, batch_size=batch_size,
        error_threshold=error_threshold, timeout=timeout, retries=retries, init=init,
        progress=progress, output_dir=output_dir, output_format=output_format,
        max_in_flight=max_in_flight, total=total, desc=desc,
    )  # fmt: skip


def map_batches(fn: Callable, inputs: Iterable, **options: Any) -> list[Any]:
    """Run ``fn`` over every input in mini-batches; return the results in input order.

    An input that failed (after ``retries``) gets an :class:`ItemError` in place
    of its result; nothing is swallowed: the summary counts failures and each
    error carries its exception type, message, traceback and worker.

    Parameters
    ----------
    fn
        Called as ``fn(item)``, or ``fn(item, state)`` when ``init`` is given.
    inputs
        Any iterable.
    **options
        Every keyword of :func:`iter_batches`: ``client``, ``cluster``,
        ``batch_size``, ``error_threshold``, ``timeout``, ``retries``, ``init``,
        ``progress``, ``output_dir``, ``output_format``, ``max_in_flight``, ``total``.

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
    files: list[Path] = []
    try:
        for batch in run:
            if batch.path is not None:
                files.append(batch.path)
            else:
                results.update(zip(batch.indices, batch.results, strict=True))
    except ErrorThresholdExceededError as exc:
        done = {i: r for i, r in results.items() if not isinstance(r, ItemError)}
        exc.results = {**done, **exc.results}
        exc.errors = {
            **{i: r for i, r in results.items() if isinstance(r, ItemError)},
            **exc.errors,
        }
        raise
    if run.out_dir is not None:
        return sorted(files)
    return [results[i] for i in range(len(results))]
