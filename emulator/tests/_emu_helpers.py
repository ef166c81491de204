"""Helpers shared by the emulator tests (submitting jobs, reading node output)."""

from __future__ import annotations

import json
import time
from typing import Any

#: A node command printing the interpreter and the environment as one JSON line.
PRINT_ENV = (
    'python -c "import json, os, sys; '
    "print('ENVJSON' + json.dumps({'exe': sys.executable, 'env': dict(os.environ)}))\""
)


def wait_for(
    predicate: Any, timeout: float = 20.0, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll ``predicate`` every ``interval`` seconds until truthy (bounded); return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def submit(
    ml: Any,
    cmd: str,
    *,
    compute: str = "cpu-cluster",
    nodes: int = 1,
    distribution: dict | None = None,
    env: dict | None = None,
    timeout: int | None = None,
    tags: dict | None = None,
    environment: Any = "azureml:dask-env:1",
) -> Any:
    """Submit a command job through the real SDK and return the created job."""
    from azure.ai.ml import command

    job = command(
        command=cmd,
        compute=compute,
        environment=environment,
        instance_count=nodes,
        distribution=distribution,
        environment_variables=env or {},
        experiment_name="emulator-tests",
        tags=tags or {},
    )
    if timeout is not None:
        job.set_limits(timeout=timeout)
    return ml.jobs.create_or_update(job)


def node_env(emu: Any, job: str, rank: int) -> dict[str, Any]:
    """Parse the PRINT_ENV output of a node."""
    for line in emu.node_log(job, rank).splitlines():
        if line.startswith("ENVJSON"):
            return json.loads(line[len("ENVJSON") :])
    raise AssertionError(f"no ENVJSON line in log of {job} rank {rank}:\n{emu.node_log(job, rank)}")


def wait_log(emu: Any, job: str, rank: int, text: str, timeout: float = 20.0) -> str:
    """Wait until a node's log contains ``text``."""
    return wait_for(
        lambda: text in emu.node_log(job, rank) and emu.node_log(job, rank),
        timeout,
        f"{text!r} in log of {job} rank {rank}",
    )
