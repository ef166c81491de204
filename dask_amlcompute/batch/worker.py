"""Worker side of a batch run: the Dask task of one mini-batch.

:func:`_run_batch` calls ``fn`` on each input of a mini-batch, turning exceptions
into :class:`~dask_amlcompute.batch.ItemError`; with a time limit the calls run in
a helper thread that is abandoned (and interrupted) when the limit is reached.
Per-worker ``init`` results are kept on the worker until :func:`_drop_state`.

These functions are pickled by reference into Dask workers, so they stay
module-level functions of this importable module.
"""

from __future__ import annotations

import ctypes
import pickle
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from .types import ItemError


class _Abandoned(BaseException):
    """Raised into the thread of a call that the batch time limit abandoned."""


_STATE_LOCK = threading.Lock()
_PROCESS_STATE: dict[str, Any] = {}
_STUCK: list[threading.Thread] = []


def _state_store(worker: Any = None) -> dict[str, Any]:
    """The ``init`` results of this worker (or of this process outside a worker)."""
    if worker is None:
        from distributed import get_worker

        try:
            worker = get_worker()
        except ValueError:
            return _PROCESS_STATE
    return worker.__dict__.setdefault("_dask_amlcompute_batch_state", {})


def _drop_state(key: str, dask_worker: Any = None) -> None:
    """Forget an ``init`` result on a worker (run through ``client.run`` at the end)."""
    with _STATE_LOCK:
        _state_store(dask_worker).pop(key, None)


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


def _run_timed(call: Callable, items: list, timeout: float, values: list, errors: dict) -> list:
    """Run ``call`` over ``items`` in a helper thread; give up at ``timeout``.

    Returns the positions that did not run because an earlier call hung.
    """
    lock = threading.Lock()
    state = {"pos": 0, "abandoned": False}
    finished = threading.Event()

    def runner() -> None:
        try:
            for pos, item in enumerate(items):
                with lock:
                    if state["abandoned"]:
                        return
                    state["pos"] = pos
                try:
                    value, err = call(item), None
                except (Exception, SystemExit) as exc:
                    value, err = None, _error(exc)
                with lock:
                    if state["abandoned"]:
                        return
                    if err is None:
                        values[pos] = value
                    else:
                        errors[pos] = err
            with lock:
                state["pos"] = len(items)
        except _Abandoned:
            return
        finally:
            finished.set()

    thread = threading.Thread(target=runner, name="dask-amlcompute-batch", daemon=True)
    thread.start()
    if finished.wait(timeout):
        return []
    with lock:
        hung = state["pos"]
        if hung >= len(items):
            return []
        state["abandoned"] = True
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
    return list(range(hung + 1, len(items)))


def _run_batch(
    fn: Callable, items: list, timeout: float | None, init: Callable | None, init_key: str
) -> tuple[list, dict[int, ItemError], list[int], str | None, int]:
    """The Dask task of one mini-batch: ``(values, errors, not_run, worker, stuck threads)``."""
    from distributed import get_worker

    try:
        worker: str | None = get_worker().address
    except ValueError:
        worker = None
    values: list = [None] * len(items)
    errors: dict[int, ItemError] = {}
    call = fn
    if init is not None:
        try:
            with _STATE_LOCK:
                store = _state_store()
                if init_key not in store:
                    store[init_key] = init()
                state = store[init_key]
        except Exception as exc:
            err = _error(RuntimeError(f"init failed on this worker: {type(exc).__name__}: {exc}"))
            err.traceback = "".join(traceback.format_exception(exc))
            return values, dict.fromkeys(range(len(items)), err), [], worker, _stuck_count()

        def call(item: Any) -> Any:
            return fn(item, state)

    not_run: list[int] = []
    if timeout is None:
        for pos, item in enumerate(items):
            try:
                values[pos] = call(item)
            except (Exception, SystemExit) as exc:
                errors[pos] = _error(exc)
    else:
        not_run = _run_timed(call, items, timeout, values, errors)
    for err in errors.values():
        err.worker = worker
    return values, errors, not_run, worker, _stuck_count()
