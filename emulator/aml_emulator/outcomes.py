"""Error bodies of failed and canceled jobs, worded like Azure ML's."""

from __future__ import annotations

import signal

from .state import NodeRecord

#: Lines of a node's standard error quoted in a failure message.
TAIL_LINES = 10


def node_failure_error(node: NodeRecord, code: int, log_file: str) -> dict[str, str]:
    """Return the job error for a node that exited non-zero or was killed.

    Parameters
    ----------
    node
        The failed node (its ``stderr_tail`` is quoted).
    code
        Exit code; negative for a signal.
    log_file
        Name of the node's log file (``user_logs/std_log_process_N.txt``).

    Returns
    -------
    dict
        ``{"code": ..., "message": ...}``; the message names the node rank,
        its address, the exit status and ends with ``Error: <stderr tail>``.
    """
    if node.killed_reason == "preempted":
        return preemption_error(node)
    if code < 0:
        try:
            what = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            what = f"was killed by signal {-code}"
    else:
        what = f"exited with status code {code}"
    tail = "\n".join(node.stderr_tail[-TAIL_LINES:]).strip()
    message = (
        f"Execution failed. User process on node rank {node.rank} ({node.ip}) {what}. "
        f"Please check log file '{log_file}' for error details."
    )
    if tail:
        message += f" Error: {tail}"
    return {"code": "UserError", "message": message}


def cancel_error(reason: str | None, limit: object, seconds: float | None) -> dict[str, str] | None:
    """Return the job error of a canceled job (None for a plain user cancel).

    Parameters
    ----------
    reason
        ``"timeout"``, ``"shutdown"`` or ``"canceled"``.
    limit
        The job's ``limits.timeout`` as submitted (e.g. ``"PT30S"``).
    seconds
        The timeout in seconds.

    Returns
    -------
    dict or None
        The error body.
    """
    if reason == "timeout":
        return {
            "code": "UserError",
            "message": (
                f"The job was canceled because its timeout was reached "
                f"(limits.timeout = {limit}, {seconds or 0:g} s)."
            ),
        }
    if reason == "shutdown":
        return {"code": "ServiceError", "message": "The emulator was stopped."}
    return None


def preemption_error(node: NodeRecord) -> dict[str, str]:
    """AML's error for a job failed by a low-priority preemption.

    The message is AML's, as users report it ("AzureMLCompute job failed.
    PreemptionError: Nodes of this job got pre-empted. Check if the run has
    failed or restarted. Reason: Received pre-emption warning signal"); the code
    ``JobPreempted`` is the emulator's own (AML's is not public).

    Parameters
    ----------
    node
        The preempted node.

    Returns
    -------
    dict
        ``{"code": ..., "message": ...}``.
    """
    return {
        "code": "JobPreempted",
        "message": (
            "AzureMLCompute job failed. PreemptionError: Nodes of this job got pre-empted. "
            "Check if the run has failed or restarted. Reason: Received pre-emption warning "
            f"signal (node {node.node_id}, rank {node.rank})"
        ),
    }
