"""Node process management: one process group per emulated node.

A node runs the job's ``command`` with ``/bin/sh -c`` in its own session
(``start_new_session=True``), so the whole node (the shell and everything it
starts) can be signalled as one process group.  Standard output goes straight
to the node's log file; standard error is copied into the same file by the
event loop and its last lines are kept for the job's error message.

In the ``isolated`` network mode the shell is started through an argv prefix
(``nsenter --net=... --``) that execs it: the shell keeps the PID, and so the
process group, that the emulator started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from .state import NodeRecord

#: Lines of standard error kept per node for error messages.
STDERR_TAIL_LINES = 20


def node_base_environment(extra: Mapping[str, str], venv: str | None = None) -> dict[str, str]:
    """Return the environment of a node process.

    Without ``venv`` (an image-only environment, or builds turned off) the
    emulator's own environment is inherited (so the current virtualenv works),
    with the directory of the running interpreter first on ``PATH`` so that
    ``python`` in a command is this interpreter.

    With ``venv`` (the environment's built virtualenv) the node runs in it, as
    in its image on AML: ``venv/bin`` first on ``PATH`` (the emulator's own
    virtualenv's ``bin`` is dropped from it),
    ``VIRTUAL_ENV`` set to it, ``PYTHONNOUSERSITE=1``, and no ``PYTHONPATH``,
    ``PYTHONHOME``, ``PYTHONSTARTUP`` or ``PYTHONUSERBASE``, so the node sees
    none of the client's site-packages.

    Parameters
    ----------
    extra
        Variables added on top (AML variables, the job's environment variables).
    venv
        The built virtualenv of the job's environment, or None.

    Returns
    -------
    dict
        The full environment.
    """
    env = dict(os.environ)
    path = env.get("PATH", "")
    env.pop("PYTHONSTARTUP", None)
    if venv is None:
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    else:
        client_bins = set()  # the client's virtualenv only: never a system bin directory
        if sys.prefix != sys.base_prefix:
            client_bins.add(os.path.realpath(os.path.join(sys.prefix, "bin")))
        if env.get("VIRTUAL_ENV"):
            client_bins.add(os.path.realpath(os.path.join(env["VIRTUAL_ENV"], "bin")))
        kept = [d for d in path.split(os.pathsep) if d and os.path.realpath(d) not in client_bins]
        env["PATH"] = os.pathsep.join([os.path.join(venv, "bin"), *kept])
        env["VIRTUAL_ENV"] = venv
        for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "CONDA_PREFIX"):
            env.pop(name, None)
        env["PYTHONNOUSERSITE"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


async def _tee_stderr(node: NodeRecord, reader: asyncio.StreamReader) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    with open(node.log_path, "ab", buffering=0) as log:
        while True:
            line = await reader.readline()
            if not line:
                break
            log.write(line)
            tail.append(line.decode("utf-8", "replace").rstrip("\n"))
            node.stderr_tail = list(tail)


async def start_node(
    node: NodeRecord, command: str, env: Mapping[str, str], prefix: Sequence[str] = ()
) -> asyncio.Task:
    """Start the node's process group.

    Parameters
    ----------
    node
        The node; ``pid``, ``process`` and ``state`` are updated.
    command
        Shell command to run.
    env
        Full environment of the process.
    prefix
        Argv run before ``/bin/sh -c command`` (the node network's
        ``command_prefix``); it must exec the shell, keeping its PID.

    Returns
    -------
    asyncio.Task
        The task copying standard error into the log (await it after exit).
    """
    os.makedirs(node.workdir, exist_ok=True)
    os.makedirs(os.path.dirname(node.log_path), exist_ok=True)
    with open(node.log_path, "ab", buffering=0) as log:
        proc = await asyncio.create_subprocess_exec(
            *prefix,
            "/bin/sh",
            "-c",
            command,
            cwd=node.workdir,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    node.process = proc
    node.pid = proc.pid
    node.state = "running"
    assert proc.stderr is not None
    return asyncio.ensure_future(_tee_stderr(node, proc.stderr))


def signal_group(node: NodeRecord, sig: int) -> bool:
    """Send a signal to the node's process group.

    Only the process group this emulator created (its pgid equals the pid of
    the shell it spawned) is signalled.

    Parameters
    ----------
    node
        The node.
    sig
        Signal number.

    Returns
    -------
    bool
        False if the group no longer exists or the node never started.
    """
    if node.pid is None:
        return False
    try:
        os.killpg(node.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def wait_node(node: NodeRecord, stderr_task: asyncio.Task | None) -> int:
    """Wait for the node's shell to exit, then clean up what it left behind.

    Processes still alive in the node's group after its shell exits are
    killed (AML tears the node's container down when the job ends).

    Parameters
    ----------
    node
        The node.
    stderr_task
        The stderr copying task returned by :func:`start_node`.

    Returns
    -------
    int
        The exit code (negative signal number if killed by a signal).
    """
    proc = node.process
    code = await proc.wait()
    signal_group(node, signal.SIGKILL)
    if stderr_task is not None:
        try:
            await asyncio.wait_for(asyncio.shield(stderr_task), 2.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            stderr_task.cancel()
    if node.exit_code is None:
        node.exit_code = code
    return code


async def stop_node(node: NodeRecord, grace: float = 3.0) -> None:
    """Terminate a node: SIGTERM to its group, SIGKILL after ``grace`` seconds.

    Parameters
    ----------
    node
        The node.
    grace
        Seconds between SIGTERM and SIGKILL.
    """
    proc = node.process
    if proc is None or proc.returncode is not None:
        signal_group(node, signal.SIGKILL)
        return
    signal_group(node, signal.SIGTERM)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
    signal_group(node, signal.SIGKILL)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)


def read_log(node: NodeRecord, max_bytes: int | None = None) -> str:
    """Return the node's log (stdout and stderr).

    Parameters
    ----------
    node
        The node.
    max_bytes
        Only the last ``max_bytes`` bytes.

    Returns
    -------
    str
        The log text ("" if it does not exist yet).
    """
    try:
        with open(node.log_path, "rb") as fh:
            if max_bytes is not None:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
