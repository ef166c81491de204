"""Worker side of a batch run: the Dask task of one mini-batch.

:func:`_run_batch` calls ``fn`` on each input, turning exceptions into
:class:`~dask_amlcompute.batch.ItemError`; under a time limit the calls run in a
helper thread that is abandoned (and interrupted) at the limit. ``init`` results
stay on the worker until :func:`_drop_state`. Pickled by reference into workers.
"""

from __future__ import annotations

import ctypes
import pickle
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from distributed import get_worker

from .types import ItemError

_STATE = "_dask_amlcompute_batch_state"  # the Worker attribute: init results by run
_STATE_LOCK = threading.Lock()
_STUCK: list[threading.Thread] = []


class _Abandoned(BaseException):
    """Raised into the thread of a call that the batch time limit abandoned."""


def _drop_state(key: str, dask_worker: Any) -> None:
    """Forget an ``init`` result on a worker (run through ``client.run`` at the end)."""
    with _STATE_LOCK:
        getattr(dask_worker, _STATE, {}).pop(key, None)


def _stuck_count() -> int:
    _STUCK[:] = [t for t in _STUCK if t.is_alive()]
    return len(_STUCK)


def _error(exc: BaseException, timed_out: bool = False) -> ItemError:
    try:
        pickle.dumps(exc)
        keep: BaseException | None = exc
    except Exception:
        keep = None
    return ItemError(
        index=-1,
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        timed_out=timed_out,
        exception=keep,
    )


def _run_calls(
    call: Callable, items: list, timeout: float | None, values: list, errors: dict
) -> Sequence[int]:
    """Run ``call`` over ``items``; with a ``timeout``, in a helper thread given up at it.

    Returns the positions that did not run because an earlier call hung.
    """
    lock, abandoned = threading.Lock(), threading.Event()
    ran = [0]  # inputs finished, in order: the next one is running

    def runner() -> None:
        try:
            for pos, item in enumerate(items):
                if abandoned.is_set():
                    return
                try:
                    value, err = call(item), None
                except (Exception, SystemExit) as exc:
                    value, err = None, _error(exc)
                with lock:
                    if abandoned.is_set():
                        return
                    values[pos], ran[0] = value, pos + 1
                    if err is not None:
                        errors[pos] = err
        except _Abandoned:
            return

    if timeout is None:
        runner()
        return []
    thread = threading.Thread(target=runner, name="dask-amlcompute-batch", daemon=True)
    thread.start()
    thread.join(timeout)
    if not thread.is_alive():
        return []
    with lock:
        hung = ran[0]
        if hung >= len(items):
            return []
        abandoned.set()
    errors[hung] = _error(
        TimeoutError(
            f"batch time limit of {timeout:g}s reached while running this input; the call "
            "was abandoned (its thread is interrupted at its next Python instruction)"
        ),
        timed_out=True,
    )
    if sys.implementation.name == "cpython" and thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(_Abandoned)
        )
    _STUCK.append(thread)
    return range(hung + 1, len(items))  # O(1) membership for the client


def _run_batch(
    fn: Callable, items: list, timeout: float | None, init: Callable | None, init_key: str
) -> tuple[list, dict[int, ItemError], Sequence[int], int]:
    """The Dask task of one mini-batch: ``(values, errors, not_run, stuck threads)``."""
    worker = get_worker()
    values: list = [None] * len(items)
    errors: dict[int, ItemError] = {}
    call = fn
    if init is not None:
        try:
            with _STATE_LOCK:
                store = worker.__dict__.setdefault(_STATE, {})
                if init_key not in store:
                    store[init_key] = init()
                state = store[init_key]
        except Exception as exc:  # the batch's inputs fail with it (init runs again next batch)
            err = _error(exc)
            err.message, err.worker = (
                f"init failed on this worker: {err.type}: {exc}",
                worker.address,
            )
            return values, dict.fromkeys(range(len(items)), err), (), _stuck_count()

        def call(item: Any) -> Any:
            return fn(item, state)

    not_run = _run_calls(call, items, timeout, values, errors)
    for err in errors.values():
        err.worker = worker.address
    return values, errors, not_run, _stuck_count()
