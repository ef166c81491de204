"""Cancel a cluster's AML jobs however its client process ends.

A process that ends without ``close()`` has no event loop or thread pool left for
:class:`~.ops.AmlOps`: exit hooks run after Python shut its pools down, and SIGTERM (a
kernel restart) or SIGHUP run none. So a cluster registers its jobs here (:func:`own`);
whatever has not ended is cancelled by one ``jobs.begin_cancel(name, polling=False)`` per job
(AML accepts it; nothing waits for the end), no retries, short socket timeouts, each in its
own daemon thread, all joined against one deadline: an exit never hangs on the control plane.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from .ops import ENDING

logger = logging.getLogger(__name__)

#: Seconds one exit waits, in all, for the cancel requests of every cluster.
EXIT_CANCEL_TIMEOUT = 5.0
#: Per-request options of a cancel at exit: one attempt, short socket timeouts (azure-core).
_REQUEST_OPTIONS: dict[str, Any] = dict(
    polling=False, retry_total=0, connection_timeout=3, read_timeout=4
)
#: Nothing left to cancel (Finalizing: the job's nodes are being released).
_ENDED = ENDING | {"CancelRequested"}  # a cancel accepted: done


@dataclass
class _Owned:
    ml_client: Any
    #: The cluster's ``ClusterState.jobs`` (name -> last known status), shared, not copied.
    jobs: dict[str, str]
    cluster: weakref.ref


_owned: dict[int, _Owned] = {}
_keys = itertools.count()
_lock = threading.RLock()  # re-entrant: a signal may arrive while this thread holds it
_exit_hook = False


def own(cluster: Any, ml_client: Any, jobs: dict[str, str]) -> int:
    """Cancel ``jobs`` if the process ends without ``cluster.close()`` (a dropped cluster too).

    Installs, once, an exit hook and (from the main thread, where SIGTERM or SIGHUP still
    have their default action) a handler that cancels before the signal ends the process.
    ``cluster`` is held weakly (at exit, one whose ``shutdown_on_close`` is now False is left
    running); ``jobs``: its jobs' last known status, as it updates them. Returns the key for
    :func:`release`.
    """
    global _exit_hook
    key = next(_keys)
    with _lock:
        _owned[key] = _Owned(ml_client, jobs, weakref.ref(cluster))
        if not _exit_hook:
            # registered after distributed's: runs before its reaper, which then finds the
            # jobs cancelled instead of failing to cancel them on a shut-down executor
            atexit.register(cancel_owned)
            _exit_hook = True
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _cancel_then_die)
    return key


def release(key: int, detached: bool = False) -> None:
    """Forget a closed cluster once its jobs ended (else exit retries); ``detached``: at once."""
    with _lock:
        owned = _owned.get(key)
        if owned is not None and (detached or all(s in _ENDED for s in list(owned.jobs.values()))):
            del _owned[key]


def cancel_owned(*keys: int, timeout: float = EXIT_CANCEL_TIMEOUT) -> None:
    """Cancel the jobs of the clusters of ``keys`` (all: none) that have not ended.

    ``timeout``: seconds to wait for all the cancel requests together.
    """
    with _lock:
        found = [_owned.pop(k) for k in (keys or list(_owned)) if k in _owned]
    threads = []
    for owned in found:
        cluster = owned.cluster()
        if cluster is not None and not getattr(cluster, "shutdown_on_close", True):
            continue  # the user chose to leave it running
        for name, status in list(owned.jobs.items()):
            if status in _ENDED:
                continue
            thread = threading.Thread(
                target=_cancel, args=(owned, name), name=f"cancel-{name}", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # no new threads this late: one bounded request right here
                _cancel(owned, name)
                continue
            threads.append(thread)
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        logger.warning("Cancelling AML jobs took longer than %.0fs; not waiting", timeout)


def _cancel(owned: _Owned, name: str) -> None:
    try:
        owned.ml_client.jobs.begin_cancel(name, **_REQUEST_OPTIONS)
    except Exception as exc:
        logger.warning("Cancelling AML job %s (cluster not closed) failed: %s", name, exc)
        return
    owned.jobs[name] = "Canceled"  # close(), if it still runs, finds nothing left to cancel
    logger.info("Cancelled AML job %s: its cluster was not closed", name)


def _cancel_then_die(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP: cancel what is owned, then let the signal end the process as before."""
    cancel_owned()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
