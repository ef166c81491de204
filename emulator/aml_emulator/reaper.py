"""Kill an emulator's node process groups when the emulator dies without cleaning up.

The emulator stops its nodes on a clean shutdown. If its process is killed
(SIGKILL, an out-of-memory kill, a CI timeout), the node process groups would
run on until their job timeouts. :class:`GroupReaper` starts one small helper
process per emulator (``python -m aml_emulator.reaper``, in its own
session so it outlives the emulator; run as a script, so it imports only the
standard library) and tells it, over a pipe, which process
groups the emulator started and which ended. When the pipe closes, which the
kernel does when the emulator exits for any reason, the helper SIGTERMs the
groups still listed, SIGKILLs them after a grace period, and exits.

Only groups the emulator registered are signalled, and a group whose leader
PID now belongs to a different process (PID reuse) is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

__all__ = ["GroupReaper", "group_running"]

logger = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL when the helper reaps.
GRACE = 3.0


def _stat(pid: int | str) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (``/proc/<pid>/stat`` field 22), None if unknown."""
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def group_running(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True  # no /proc: trust killpg
    for pid in pids:
        fields = _stat(pid)
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


class GroupReaper:
    """The emulator's side: register the node process groups it starts.

    :meth:`start` launches the helper (the first :meth:`watch` does if needed).
    Every method is best effort: a helper that cannot be reached is logged
    once, never raised.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._broken = self._closed = False

    def start(self) -> None:
        """Start the helper process (idempotent).

        It runs this file as a script, so it imports nothing but the standard library.
        """
        if self._proc is not None or self._broken or self._closed:
            return
        try:
            self._proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        except OSError as exc:
            self._unavailable(exc)

    def _unavailable(self, exc: OSError) -> None:
        self._broken = True
        logger.warning("Node reaper unavailable (%s): nodes of a killed emulator may linger "
                       "until their job timeouts", exc)  # fmt: skip

    def _send(self, line: str) -> None:
        self.start()
        if self._proc is None:
            return
        stdin = self._proc.stdin
        assert stdin is not None  # started with stdin=PIPE
        try:
            stdin.write(line + "\n")
            stdin.flush()
        except OSError as exc:
            self._unavailable(exc)

    def watch(self, pgid: int) -> None:
        """Register a process group the emulator started (its leader's PID)."""
        self._send(f"watch {int(pgid)}")

    def forget(self, pgid: int) -> None:
        """Unregister a process group that has ended."""
        if self._proc is not None:
            self._send(f"forget {int(pgid)}")

    def close(self, timeout: float = 10.0) -> None:
        """Close the pipe (the helper reaps what is still registered) and wait for it."""
        proc, self._proc, self._closed = self._proc, None, True
        if proc is None:
            return
        assert proc.stdin is not None  # started with stdin=PIPE
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    @property
    def pid(self) -> int | None:
        """PID of the helper process, None before the first :meth:`watch`."""
        return self._proc.pid if self._proc is not None else None


def reap(groups: dict[int, str], grace: float = GRACE) -> list[int]:
    """SIGTERM, then after ``grace`` seconds SIGKILL, each registered group still there.

    Parameters
    ----------
    groups
        Process group id to its leader's start time when registered.
    grace
        Seconds between SIGTERM and SIGKILL.

    Returns
    -------
    list of int
        The groups that were signalled.
    """
    ours = []
    for pgid, started in groups.items():
        now = _start_time(pgid)
        if now is not None and now != started:
            continue  # the leader's PID was reused by another process: not ours
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
            ours.append(pgid)
    deadline = time.monotonic() + grace
    while any(map(group_running, ours)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pgid in ours:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return ours


def main() -> None:
    """Read ``watch PGID`` / ``forget PGID`` lines until EOF, then reap what is left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe ends this process
    groups: dict[int, str] = {}
    for line in sys.stdin:
        op, _, arg = line.strip().partition(" ")
        if not arg.isdigit():
            continue
        if op == "watch":
            started = _start_time(int(arg))
            if started is not None:  # else it already ended: nothing to guard
                groups[int(arg)] = started
        elif op == "forget":
            groups.pop(int(arg), None)
    reap(groups)


if __name__ == "__main__":
    main()
