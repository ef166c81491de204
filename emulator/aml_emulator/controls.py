"""Inspection and fault-injection methods of :class:`~aml_emulator.Emulator`.

Kept apart from the lifecycle code; every method hops onto the emulator's
event loop through ``self._call``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from .config import EmulatorConfig
from .engine import Engine
from .handlers import FaultState, ServerContext
from .nodes import read_log
from .state import JobRecord, NodeRecord


class EmulatorControls:
    """Mixin: read job/node state and inject faults (needs ``_call`` and ``_faults``)."""

    _faults: FaultState
    _ctx: ServerContext | None
    config: EmulatorConfig
    #: Runs ``fn(engine)`` on the emulator's loop and returns its result (``Emulator._call``).
    _call: Callable[[Callable[[Engine], Any]], Any]

    # ------------------------------------------------------------- inspection
    def job_status(self, name: str) -> str:
        """Return a job's status (``"Queued"``, ``"Running"``, ``"Completed"``...).

        Parameters
        ----------
        name
            Job name.

        Returns
        -------
        str
            The status.
        """
        return self._call(lambda e: e.job(name).status)

    def job_error(self, name: str) -> dict[str, str] | None:
        """Return a finished job's error (``code``, ``message``) or None.

        Parameters
        ----------
        name
            Job name.

        Returns
        -------
        dict or None
            The error.
        """
        return self._call(lambda e: dict(error) if (error := e.job(name).error) else None)

    def job_nodes(self, name: str) -> list[dict[str, Any]]:
        """Return the job's nodes.

        Parameters
        ----------
        name
            Job name.

        Returns
        -------
        list of dict
            Per node: ``rank, ip, node_id, pid, state, ssh_port, exit_code,
            log_path, host_public_key, workdir``.
        """
        return self._call(lambda e: [n.as_dict() for n in e.job(name).nodes])

    def nodes_in_use(self, compute: str = "cpu-cluster") -> int:
        """Return how many nodes of a compute are held by jobs.

        Parameters
        ----------
        compute
            Compute name.

        Returns
        -------
        int
            Nodes in use.
        """
        return self._call(lambda e: e.nodes_in_use(compute))

    def active_jobs(self) -> list[str]:
        """Return the names of jobs that have not finished.

        Returns
        -------
        list of str
            Job names, oldest first.
        """
        return self._call(
            lambda e: [
                j.name
                for j in sorted(e.jobs.values(), key=lambda j: j.created)
                if not j.is_terminal
            ]
        )

    def node_log(self, job_name: str, rank: int) -> str:
        """Return a node's standard output and error.

        Parameters
        ----------
        job_name
            Job name.
        rank
            Node rank.

        Returns
        -------
        str
            Log text ("" before the node starts).
        """

        def _node(e: Engine) -> NodeRecord | None:
            job = e.job(job_name)
            if not job.nodes and rank < job.instance_count:
                return None  # not started yet
            return job.nodes[rank]

        node = self._call(_node)
        return "" if node is None else read_log(node)

    def host_key_for(self, job_name: str, rank: int) -> str | None:
        """Return the SSH host public key (OpenSSH format) of a job's node.

        Parameters
        ----------
        job_name
            Job name.
        rank
            Node rank.

        Returns
        -------
        str or None
            The key, or None when the node has no SSH endpoint.
        """

        def _key(e: Engine) -> str | None:
            job = e.job(job_name)
            return job.nodes[rank].host_public_key if job.nodes else None

        return self._call(_key)

    def job_queue_reason(self, name: str) -> str | None:
        """Return why a ``Queued`` job waits for vCPU quota, None when it does not.

        The same text is the job property ``emulator.queueReason`` while it
        waits and a ``Quota`` warning of its run details afterwards.

        Parameters
        ----------
        name
            Job name.

        Returns
        -------
        str or None
            AML's "must wait in a queue until quota is available", with numbers.
        """
        return self._call(lambda e: e.job(name).queue_reason)

    # ----------------------------------------------------- computes and quota
    def computes(self) -> dict[str, str]:
        """Return the workspace's computes and their provisioning state.

        Returns
        -------
        dict
            Name to ``provisioningState`` (``Creating``, ``Succeeded``,
            ``Deleting``); serverless jobs' nodes are not computes.
        """
        return self._call(
            lambda e: {
                c.spec.name: c.provisioning_state for c in e.computes.values() if not c.serverless
            }
        )

    def compute_exists(self, name: str) -> bool:
        """Return whether the workspace has a compute of that name (being created or deleted too).

        Parameters
        ----------
        name
            Compute name (case-insensitive).

        Returns
        -------
        bool
            Whether ``GET /computes/{name}`` finds it.
        """
        return name.lower() in {n.lower() for n in self.computes()}

    def set_quota(self, limit: int, family: str | None = None, tier: str = "Dedicated") -> None:
        """Change a vCPU quota limit (``list_usage`` reports it; queued jobs that now fit start).

        Parameters
        ----------
        limit
            New limit in vCPUs.
        family
            VM family (``"standardDSv3Family"``), or None for the regional total.
        tier
            ``"Dedicated"`` or ``"LowPriority"`` (``"Spot"`` is the same quota).
        """
        self._call(lambda e: e.set_quota(int(limit), family, tier))

    def vcpus_in_use(self, family: str | None = None, tier: str = "Dedicated") -> int:
        """Return the vCPUs of allocated nodes (busy or idle) counted against a quota.

        Parameters
        ----------
        family
            VM family, or None for the regional total of the tier.
        tier
            ``"Dedicated"`` or ``"LowPriority"``.

        Returns
        -------
        int
            ``currentValue`` of that ``list_usage`` entry.
        """
        from .capacity import tier_of

        key = (family.lower() if family else None, tier_of(tier))
        return self._call(lambda e: e.capacity.usage(e.computes.values()).get(key, 0))

    def job_service_daemons(self, job_name: str) -> list[dict[str, Any]]:
        """Return the SSH daemons of a job's services (``services={"ssh": SshJobService(...)}``).

        They listen in the nodes' network and are reached through the
        ``ProxyEndpoint`` of ``ml_client.jobs.show_services``; this lists them
        for tests and debugging.

        Parameters
        ----------
        job_name
            Job name.

        Returns
        -------
        list of dict
            Per daemon: ``rank, service, ip, port, host_public_key``; empty
            before the nodes start and after the job ends.
        """
        return self._call(lambda e: e.job_services.daemons(job_name))

    def wait_job(
        self, name: str, timeout: float = 60.0, statuses: Iterable[str] | None = None
    ) -> str:
        """Wait until a job finishes (or reaches one of ``statuses``).

        Parameters
        ----------
        name
            Job name.
        timeout
            Upper bound in seconds.
        statuses
            Stop at these statuses instead of the terminal ones.

        Returns
        -------
        str
            The status reached.

        Raises
        ------
        TimeoutError
            If the job did not get there in time (message gives its status).
        """
        from .state import TERMINAL_STATUSES

        wanted = set(statuses) if statuses is not None else set(TERMINAL_STATUSES)
        deadline = time.monotonic() + timeout
        while True:
            status = self.job_status(name)
            if status in wanted:
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {name} still {status} after {timeout:g} s")
            time.sleep(0.05)

    # ------------------------------------------------------------ round trips
    @property
    def request_latency(self) -> float:
        """Seconds each control-plane and run-history request waits (settable while running)."""
        return self.config.request_latency

    @request_latency.setter
    def request_latency(self, value: float) -> None:
        if not value >= 0:
            raise ValueError("request_latency must be a number of seconds >= 0")
        self.config.request_latency = float(value)
        if (ctx := self._ctx) is not None:
            self._call(lambda e: setattr(ctx, "request_latency", float(value)))

    def request_log(self, clear: bool = False) -> list[dict[str, Any]]:
        """Return the control-plane and run-history requests served, oldest first.

        Also served as ``GET /emulator/requests``.

        Parameters
        ----------
        clear
            Empty the log after reading it.

        Returns
        -------
        list of dict
            Per request: ``method, path, status, start, end`` (``time.time()``
            when it arrived and when its answer was sent, latency included).
        """
        ctx = self._ctx

        def _read(_: Engine) -> list[dict[str, Any]]:
            if ctx is None:
                return []
            log = list(ctx.request_log)
            if clear:
                ctx.request_log.clear()
            return log

        return self._call(_read)

    # ---------------------------------------------------------- fault injection
    def fail_node(self, job_name: str, rank: int) -> None:
        """Kill a node's process group; the job then fails naming that node.

        Parameters
        ----------
        job_name
            Job name.
        rank
            Node rank.
        """
        self._call(lambda e: e.kill_node(job_name, rank))

    def preempt_node(self, job_name: str, rank: int, requeue: bool = False) -> None:
        """Emulate a low-priority preemption of a node: it is killed, the job fails.

        Works on any job: one on a ``LowPriority`` compute or a serverless ``Spot``
        job is what AML preempts.

        Parameters
        ----------
        job_name
            Job name.
        rank
            Node rank.
        requeue
            AML runs the job again on new nodes instead of failing it.
        """
        self._call(lambda e: e.kill_node(job_name, rank, preempted=True, requeue=requeue))

    def add_past_jobs(self, template: str, count: int, tags: dict | None = None) -> None:
        """Record ``count`` ended copies of job ``template``: a long job history.

        Each copy has its own name, the template's submitted properties with
        ``tags`` instead of its tags, ``Completed`` status, and was created
        before it; none runs.

        Parameters
        ----------
        template
            Name of a job to copy.
        count
            How many copies.
        tags
            The copies' tags (none by default).
        """
        import asyncio
        import copy

        def _add(e: Engine) -> None:
            job = e.job(template)
            for i in range(int(count)):
                past = JobRecord(
                    name=f"{template}-past-{i}",
                    properties={**copy.deepcopy(job.properties), "tags": dict(tags or {})},
                    compute=job.compute,
                    instance_count=job.instance_count,
                    created=job.created - 1 - i,
                    status="Completed",
                )
                past.done, past.wake = asyncio.Event(), asyncio.Event()
                past.done.set()
                e.jobs[past.name] = past

        self._call(_add)

    def set_run_tags_on_job(self, enabled: bool) -> None:
        """Show (default) or withhold mlflow run tags in the job resource's tags.

        Withheld, they are only in run history (``GET .../runs/{id}``), as when
        AML copies them to the job late.

        Parameters
        ----------
        enabled
            Whether ``GET /jobs/{name}`` includes tags set through mlflow.
        """
        self._call(lambda e: setattr(e, "run_tags_on_job", bool(enabled)))

    def set_job_list_lag(self, seconds: float) -> None:
        """Serve job statuses in the job list (``GET /jobs``) as they were ``seconds`` ago.

        ``GET /jobs/{name}`` stays current. Nothing in AML's documentation says
        the list is as fresh as a GET, so a client must not conclude from the
        list alone that a job went back to an earlier status.

        Parameters
        ----------
        seconds
            How far the list lags (0: in step, the default).
        """
        self._call(lambda e: setattr(e, "job_list_lag", max(0.0, float(seconds))))

    def inject_http_errors(
        self, count: int, status: int = 503, retry_after: float | None = None
    ) -> None:
        """Answer the next ``count`` control-plane requests with an HTTP error.

        Node-facing routes (mlflow, logs) are not affected.

        Parameters
        ----------
        count
            Number of requests to fail.
        status
            HTTP status (429 or 5xx).
        retry_after
            ``Retry-After`` header value in seconds.
        """
        faults = self._faults

        def _set(_: Engine) -> None:
            faults.remaining = int(count)
            faults.status = int(status)
            faults.retry_after = retry_after

        self._call(_set)

    def pending_http_errors(self) -> int:
        """Return how many injected HTTP errors are still to be served.

        Returns
        -------
        int
            Remaining injected errors.
        """
        return self._call(lambda e: self._faults.remaining)
