"""Job lifecycle: queueing on compute capacity, provisioning, node processes, outcomes.

All methods run on the emulator's event loop.  A job walks
NotStarted -> Preparing -> Queued -> Running -> Completed | Failed | Canceled,
in AML's order (JobStatus, learn.microsoft.com/javascript/api/@azure/arm-machinelearning/
jobstatus): Preparing "the run environment is being prepared" (the image build), Queued
"waiting for all required nodes to be ready"; a preempted job that AML runs again goes back
to Queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import identity, outcomes
from . import nodes as nodeproc
from .capacity import Capacity, tier_of
from .codes import CodeStore, materialise
from .config import ComputeSpec, EmulatorConfig
from .envbuild import (
    BUILD_FAILED_FORMAT,
    BUILD_FAILED_MESSAGE,
    BUILD_LOG_NAME,
    BuildPlan,
    BuildResult,
    EnvironmentBuilder,
    EnvironmentBuildError,
    plan_build,
)
from .errors import ApiError
from .jobservice import JobServices
from .jobspec import JobSpec, environment_reference, environment_report, node_variables, parse_job
from .network import LoopbackNetwork, NodeNetwork
from .reaper import GroupReaper
from .state import ComputeState, EnvironmentVersion, JobRecord, NodeRecord

#: What a PUT of an existing job may change on AML; anything else is refused.
_MUTABLE_JOB_FIELDS = ("description", "tags", "displayName", "properties", "isArchived")


def _fixed(props: dict[str, Any]) -> dict[str, Any]:
    """The part of a job's ``properties`` a second PUT must leave as it is."""
    return {k: v for k, v in props.items() if k not in _MUTABLE_JOB_FIELDS}


logger = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL when a job is canceled or times out.
KILL_GRACE = 3.0
#: Seconds between quota checks of a job queued for want of quota (idle nodes of other
#: computes scale down on a clock, not on an event).
QUOTA_RECHECK = 0.5
#: Third octets of node addresses (``127.{net}.{index + 1}.{slot + 1}``) go up to 254.
MAX_COMPUTE_INDEX = 253


@dataclass
class SharedBuild:
    """One environment build in this emulator and the jobs waiting for it."""

    plan: BuildPlan
    task: asyncio.Task[BuildResult]
    waiters: set[str]
    started: float


@dataclass
class Endpoints:
    """Addresses the engine hands to nodes."""

    tracking_uri: str
    cert_path: str | None = None
    #: The nodes' ``azureml://`` tracking URI (the emulator's TLS tracking endpoint).
    node_tracking_uri: str = ""
    #: The CA certificate of that endpoint, which the nodes' trust store holds.
    node_ca_cert: str | None = None


def log_name(rank: int) -> str:
    """Return the AML-style log file name of a node.

    Parameters
    ----------
    rank
        Node rank.

    Returns
    -------
    str
        ``user_logs/std_log_process_{rank}.txt``.
    """
    return f"user_logs/std_log_process_{rank}.txt"


class Engine:
    """The emulated workspace: computes, environments, jobs and their nodes.

    Parameters
    ----------
    config
        Computes, environments and the provisioning delay.
    workdir
        Directory for job working directories and logs.
    endpoints
        Tracking URI (and certificate) given to nodes.
    ssh_factory
        ``ssh_factory(compute_spec, node) -> awaitable server`` starting a
        node's SSH endpoint; None disables SSH.
    net
        Second octet of the node addresses (``127.{net}.N.M``).
    network
        The network the nodes live in (default: this machine's loopback).
    """

    def __init__(
        self,
        config: EmulatorConfig,
        workdir: str,
        endpoints: Endpoints,
        ssh_factory: Callable[..., Any] | None = None,
        net: int = 0,
        network: NodeNetwork | None = None,
    ) -> None:
        self.workdir = workdir
        self.network: NodeNetwork = network if network is not None else LoopbackNetwork()
        self.endpoints = endpoints
        self.provisioning_delay = float(config.provisioning_delay)
        self.net = net
        self.computes: dict[str, ComputeState] = {
            spec.name.lower(): ComputeState(spec=spec, index=i, net=net)
            for i, spec in enumerate(config.computes)
        }
        #: VM sizes and vCPU quota of the region (``list_sizes``, ``list_usage``).
        self.capacity = Capacity(config.vm_sizes, config.quota)
        #: Seconds a compute create / delete operation takes.
        self.compute_provisioning_delay = float(config.compute_provisioning_delay)
        #: Tasks the engine started outside any job (closing a deleted compute's network).
        self._background: set[asyncio.Task[Any]] = set()
        self.jobs: dict[str, JobRecord] = {}
        self.reaper = GroupReaper()  # kills our node groups if this process dies uncleanly
        self.reaper.start()
        #: Copy mlflow run tags into the job resource's tags (AML does, possibly late).
        self.run_tags_on_job = True
        #: Seconds the job list (``GET /jobs``) lags ``GET /jobs/{name}`` (0: in step).
        self.job_list_lag = 0.0
        self.specs: dict[str, JobSpec] = {}
        #: the ``properties`` of each job's first PUT, to refuse a different second one
        self._submitted: dict[str, dict[str, Any]] = {}
        self.environments: dict[str, dict[str, EnvironmentVersion]] = {}
        self._ssh_factory = ssh_factory
        #: AML's job SSH services (``services={"ssh": SshJobService(...)}``) of the jobs.
        self.job_services = JobServices(config.job_service_delay)
        self._closing = False
        #: Code snapshots (``command(code=...)``) and the blob storage (Azurite) holding them.
        self.codes = CodeStore(os.path.join(workdir, "codes"), self.reaper)
        for env in config.environments:
            self.put_environment(env.name, env.version, {"image": env.image})

    # ------------------------------------------------------------------ lookups
    def compute(self, name: str) -> ComputeState:
        """Return a compute by name (case-insensitive).

        Parameters
        ----------
        name
            Compute name.

        Returns
        -------
        ComputeState
            The compute.

        Raises
        ------
        ApiError
            404 if there is no such compute.
        """
        found = self.computes.get(name.lower())
        if found is None or found.serverless:  # serverless pools have no name to address
            raise ApiError(404, "ResourceNotFound", f"Compute '{name}' was not found in workspace")
        return found

    def job(self, name: str) -> JobRecord:
        """Return a job by name.

        Parameters
        ----------
        name
            Job name.

        Returns
        -------
        JobRecord
            The job.

        Raises
        ------
        ApiError
            404 if there is no such job.
        """
        try:
            return self.jobs[name]
        except KeyError:
            raise ApiError(404, "UserError", f"Job {name} not found.") from None

    # ------------------------------------------------------------- environments
    def put_environment(
        self, name: str, version: str, properties: dict[str, Any]
    ) -> tuple[EnvironmentVersion, bool]:
        """Create or update an environment version.

        Parameters
        ----------
        name, version
            Environment name and version.
        properties
            REST ``properties`` (image, conda file, ...).

        Returns
        -------
        tuple
            ``(environment, created)``.
        """
        versions = self.environments.setdefault(name, {})
        existing = versions.get(version)
        if existing is not None:
            existing.properties.update(properties)
            return existing, False
        env = EnvironmentVersion(name=name, version=version, properties=dict(properties))
        versions[version] = env
        return env, True

    def environment(self, name: str, version: str) -> EnvironmentVersion:
        """Return an environment version.

        Parameters
        ----------
        name, version
            Environment name and version.

        Returns
        -------
        EnvironmentVersion
            The version.

        Raises
        ------
        ApiError
            404 if absent.
        """
        try:
            return self.environments[name][version]
        except KeyError:
            raise ApiError(
                404, "UserError", f"Environment {name}:{version} not found in workspace"
            ) from None

    def job_environment(self, name: str, version: str) -> EnvironmentVersion:
        """Return the environment version a submitted job names, as AML checks it at submit.

        AML refuses a job whose environment version is not registered, before
        the job exists: ``(UserError) No environment exists for name: <name>,
        version: <version>, label:`` (reported in Azure/azure-sdk-for-python#38594).
        ``name@latest`` never reaches this point: the SDK resolves it to a
        version first.

        Parameters
        ----------
        name, version
            Environment name and version from the job's ``environmentId``.

        Returns
        -------
        EnvironmentVersion
            The version.

        Raises
        ------
        ApiError
            404 ``UserError`` if absent (nothing is created).
        """
        found = self.environments.get(name, {}).get(version)
        if found is None:
            message = f"No environment exists for name: {name}, version: {version}, label: "
            raise ApiError(404, "UserError", message)
        return found

    # --------------------------------------------------------------------- jobs
    def submit(self, name: str, body: Any) -> tuple[JobRecord, bool]:
        """Create a job from a ``PUT /jobs/{name}`` body and start its lifecycle.

        Re-submitting an existing name updates its tags, display name and
        description only (as AML, which rejects other changes).

        Parameters
        ----------
        name
            Job name.
        body
            Parsed JSON body.

        Returns
        -------
        tuple
            ``(job, created)``.

        Raises
        ------
        ApiError
            400 for invalid bodies, unknown computes or environments.
        """
        if self._closing:
            raise ApiError(503, "ServiceUnavailable", "the emulator is shutting down")
        if name in self.jobs:
            job = self.jobs[name]
            props = body.get("properties") if isinstance(body, dict) else None
            if not isinstance(props, dict) or _fixed(props) != _fixed(self._submitted[name]):
                # AML: job names are unique forever; a second PUT may change only these
                # fields (the service's message, quoted in shared/DESIGN.md).
                raise ApiError(
                    400,
                    "UserError",
                    f"A job with this name already exists: {name}. Only description, tags, "
                    "displayName, properties, and isArchived can be updated.",
                )
            for key in _MUTABLE_JOB_FIELDS:
                if key in props and props[key] is not None and key != "properties":
                    job.properties[key] = props[key]
            return job, False
        spec = parse_job(name, body)
        pool = self._serverless_spec(spec) if spec.serverless else None
        found = None if pool else self.computes.get(spec.compute.lower())
        if pool is None and (
            found is None or found.serverless or found.provisioning_state == "Deleting"
        ):
            raise ApiError(
                400,
                "UserError",
                f"Compute target '{spec.compute}' not found in workspace "
                f"'{identity.WORKSPACE_NAME}'.",
            )
        if found is not None and not found.spec.runs_jobs:
            raise ApiError(
                400,
                "UserError",
                f"Compute '{found.spec.name}' of type {found.spec.kind} cannot "
                "run command jobs in the emulator.",
            )
        ref = environment_reference(spec.properties["environmentId"])
        env_props = self.job_environment(*ref).properties if ref is not None else None
        compute = self._add_compute(pool, serverless=True) if pool else found
        assert compute is not None  # one of the two, checked above
        props = dict(spec.properties)
        report = environment_report(spec.properties["environmentId"], env_props)
        props["properties"] = {
            **(props.get("properties") or {}),
            "emulator.environment": "\n".join(report),
        }
        props.setdefault("experimentName", spec.experiment_name)
        job = JobRecord(
            name=name,
            properties=props,
            compute=compute.spec.name,
            instance_count=spec.instance_count,
            timeout_seconds=spec.timeout_seconds,
        )
        job.done = asyncio.Event()
        job.wake = asyncio.Event()
        self.jobs[name] = job
        self.specs[name] = spec
        self.job_services.declare(name, spec.ssh_services)
        self._submitted[name] = copy.deepcopy(body["properties"])
        job.task = asyncio.ensure_future(self._lifecycle(job, spec, compute))
        return job, True

    def _serverless_spec(self, spec: JobSpec) -> ComputeSpec:
        """The implicit pool of a serverless job; 400 when its size or quota cannot serve it.

        AML refuses at submit a serverless job whose ``instance_type`` it does not
        offer or whose instances can never fit the quota (Microsoft Learn,
        *how-to-use-serverless-compute*, *Quota*: "you see an error").
        """
        tier = tier_of(spec.job_tier)
        if spec.instance_type is None:
            size = self.capacity.default_serverless_size(spec.instance_count, tier)
        else:
            found = self.capacity.size(spec.instance_type)
            if found is None or "amlcompute" not in {
                t.lower() for t in found.supported_compute_types
            }:
                message = self.capacity.unknown_size_error(spec.instance_type, f"Job '{spec.name}'")
                raise ApiError(400, "UserError", message)
            size = found
        if tier != "Dedicated" and not size.low_priority_capable:
            raise ApiError(400, "UserError", f"VM size {size.name} has no Spot (low priority) VMs.")
        error = self.capacity.serverless_quota_error(size, tier, spec.instance_count)
        if error is not None:
            raise ApiError(400, "UserError", error)
        if spec.instance_count > 250:
            raise ApiError(400, "UserError", "resources.instanceCount must be at most 250")
        return ComputeSpec(
            name=f"serverless_{spec.name}",  # "_" is never in a compute's name
            max_nodes=spec.instance_count,
            vm_size=size.name,
            idle_seconds_before_scaledown=0,  # the pool goes with its job
            admin_user=None,
            ssh_public_access=False,
            vm_priority=tier,
        )

    # ----------------------------------------------------------------- computes
    def _add_compute(
        self, spec: ComputeSpec, *, serverless: bool = False, state: str = "Succeeded"
    ) -> ComputeState:
        """Register a compute (or a serverless job's pool) on the lowest free address index."""
        used = {c.index for c in self.computes.values()}
        free = [i for i in range(MAX_COMPUTE_INDEX + 1) if i not in used]
        if not free:
            raise ApiError(503, "ServiceUnavailable", "the emulator has no node addresses left")
        compute = ComputeState(spec=spec, index=free[0], net=self.net)
        compute.serverless = serverless
        compute.provisioning_state = state
        self.computes[spec.name.lower()] = compute
        return compute

    def create_compute(self, spec: ComputeSpec) -> ComputeState:
        """Start creating a compute: ``Creating`` now, ``Succeeded`` after the delay.

        Jobs may target it at once; they stay ``Queued`` until it is ready.

        Parameters
        ----------
        spec
            The validated compute.

        Returns
        -------
        ComputeState
            The new compute.
        """
        compute = self._add_compute(spec, state="Creating")
        asyncio.get_running_loop().call_later(
            self.compute_provisioning_delay, self._compute_created, compute
        )
        return compute

    def update_compute(self, compute: ComputeState, spec: ComputeSpec) -> None:
        """Apply new scale settings (max and min nodes, idle time) to a compute.

        Parameters
        ----------
        compute
            The compute.
        spec
            Its new settings.

        Raises
        ------
        ApiError
            409 when fewer nodes than its jobs hold are asked for.
        """
        try:
            compute.resize(spec.max_nodes)
        except ValueError as exc:
            raise ApiError(409, "Conflict", str(exc)) from None
        compute.spec.min_nodes = spec.min_nodes
        compute.spec.idle_seconds_before_scaledown = spec.idle_seconds_before_scaledown
        self._schedule()

    def _compute_created(self, compute: ComputeState) -> None:
        if compute.provisioning_state == "Creating":
            compute.provisioning_state = "Succeeded"
            self._schedule()

    def delete_compute(self, name: str) -> ComputeState:
        """Start deleting a compute: ``Deleting`` now, gone after the delay.

        Its unfinished jobs fail at once with AML's ``AzureMLCompute cluster
        <name> does not exist`` (UserError, as in Azure/MachineLearningNotebooks#906).

        Parameters
        ----------
        name
            Compute name.

        Returns
        -------
        ComputeState
            The compute being deleted.
        """
        compute = self.compute(name)
        compute.provisioning_state = "Deleting"
        error = {
            "code": "UserError",
            "message": f"AzureMLCompute cluster {compute.spec.name} does not exist",
        }
        for job in self.jobs.values():
            if job.compute == compute.spec.name and not job.is_terminal and job.failure is None:
                job.failure = dict(error)
                job.wake.set()
        asyncio.get_running_loop().call_later(
            self.compute_provisioning_delay, self._compute_deleted, compute
        )
        return compute

    def _compute_deleted(self, compute: ComputeState) -> None:
        self._drop_compute(compute)

    def _drop_compute(self, compute: ComputeState) -> None:
        """Unregister a compute and, once its jobs have ended, close its network."""
        if self.computes.get(compute.spec.name.lower()) is compute:
            del self.computes[compute.spec.name.lower()]
        jobs = [j for j in self.jobs.values() if j.compute == compute.spec.name and j.done]

        async def close() -> None:
            pending = [asyncio.ensure_future(j.done.wait()) for j in jobs if not j.is_terminal]
            if pending:
                await asyncio.wait(pending, timeout=KILL_GRACE + 10.0)
                for waiter in pending:
                    waiter.cancel()
            if compute.spec.name.lower() not in self.computes:  # not created again meanwhile
                await self.network.release(compute.spec.name)

        task = asyncio.ensure_future(close())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def set_quota(self, limit: int, family: str | None = None, tier: str = "Dedicated") -> None:
        """Change a vCPU limit; queued jobs that now fit start.

        Parameters
        ----------
        limit
            New limit.
        family
            VM family (e.g. ``standardDSv3Family``), or None for the regional total.
        tier
            ``Dedicated`` or ``LowPriority`` (``Spot``).
        """
        self.capacity.set_limit(limit, family, tier)
        self._schedule()

    def cancel(self, name: str, reason: str = "canceled") -> JobRecord:
        """Request cancellation of a job (no-op if it already ended).

        Parameters
        ----------
        name
            Job name.
        reason
            ``"canceled"``, ``"timeout"`` or ``"shutdown"``.

        Returns
        -------
        JobRecord
            The job.
        """
        job = self.job(name)
        if not job.is_terminal and job.cancel_reason is None:
            job.cancel_reason = reason
            job.status = "CancelRequested"
            job.wake.set()
        return job

    def kill_node(
        self, name: str, rank: int, preempted: bool = False, requeue: bool = False
    ) -> NodeRecord:
        """Kill one node's process group (fault injection).

        Parameters
        ----------
        name
            Job name.
        rank
            Node rank.
        preempted
            Report the loss as a low-priority preemption.
        requeue
            With ``preempted``: AML runs the job again instead of failing it
            (both outcomes are reported by AML users: "Check if the run has failed
            or restarted"): every node stops, the job goes back to ``Queued`` and
            starts over on newly allocated nodes.

        Returns
        -------
        NodeRecord
            The node.

        Raises
        ------
        ApiError
            404 if the job or node does not exist.
        """
        job = self.job(name)
        if not 0 <= rank < len(job.nodes):
            raise ApiError(404, "NotFound", f"job {name} has no node of rank {rank}")
        node = job.nodes[rank]
        if preempted and requeue and not job.is_terminal and job.cancel_reason is None:
            job.requeue = True
            node.killed_reason = "preempted"
        elif job.failure is None and not job.is_terminal:
            if preempted:
                job.failure = outcomes.preemption_error(node)
                node.killed_reason = "preempted"
            else:
                node.killed_reason = "killed"
        node.state = "preempted" if preempted else "leaving"
        nodeproc.signal_group(node, signal.SIGKILL)
        job.wake.set()
        return node

    def nodes_in_use(self, compute: str) -> int:
        """Return the number of nodes held by jobs on a compute.

        Parameters
        ----------
        compute
            Compute name.

        Returns
        -------
        int
            Nodes in use.
        """
        return self.compute(compute).in_use

    # ---------------------------------------------------------------- lifecycle
    async def _pause(self, job: JobRecord, seconds: float | None) -> None:
        """Sleep until ``seconds`` pass or the job is woken (cancel, fault, allocation)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(job.wake.wait(), seconds)
        job.wake.clear()

    def _schedule(self) -> None:
        """Give free nodes to queued jobs, first come first served per compute.

        A job that has its nodes free on its compute but whose new VMs would
        exceed a vCPU quota stays at the head of the queue with the reason
        (``queue_reason``) until quota frees up (see :mod:`.capacity`).
        """
        for compute in list(self.computes.values()):
            if compute.provisioning_state != "Succeeded":
                continue
            while compute.queue:
                job = self.jobs[compute.queue[0]]
                if job.is_terminal or job.cancel_reason is not None or job.failure is not None:
                    compute.queue.pop(0)
                    continue
                if compute.free < job.instance_count:
                    break
                reason = self.capacity.shortfall(
                    self.computes.values(), compute, compute.new_vms(job.instance_count)
                )
                if reason is not None:
                    if job.queue_reason is None:
                        job.warnings.append({"source": "Quota", "message": reason})
                    job.queue_reason = reason
                    break
                job.queue_reason = None
                compute.queue.pop(0)
                job.slots = compute.allocate(job.name, job.instance_count)
                job.wake.set()

    def _finish(self, job: JobRecord, status: str, error: dict[str, Any] | None = None) -> None:
        job.status = status
        job.error = error
        job.end_time = time.time()

    async def _make_nodes(self, job: JobRecord, compute: ComputeState) -> None:
        base = os.path.join(self.workdir, "jobs", job.name)
        for rank, slot in enumerate(job.slots or []):
            job.nodes.append(
                NodeRecord(
                    rank=rank,
                    slot=slot,
                    ip=compute.ip_for_slot(slot),
                    node_id=compute.node_id_for_slot(slot),
                    workdir=os.path.join(base, f"node-{rank}", "wd"),
                    log_path=os.path.join(base, "logs", log_name(rank)),
                )
            )
        code_id = self.specs[job.name].code_id if job.name in self.specs else None
        if code_id:  # each node gets its own copy of the snapshot as working directory, all at
            # once off the event loop (AML's nodes download it each on its own VM)
            copies = [
                asyncio.to_thread(materialise, self.codes, code_id, n.workdir) for n in job.nodes
            ]
            await asyncio.gather(*copies)

    async def _start_ssh(self, compute: ComputeState, job: JobRecord) -> None:
        if self._ssh_factory is None or not compute.spec.ssh_enabled:
            return
        for node in job.nodes:
            try:
                server = await self._ssh_factory(compute.spec, node)
            except Exception:  # an SSH failure must not kill the job
                logger.exception(
                    "could not start the SSH endpoint of %s rank %d", job.name, node.rank
                )
                continue
            node.ssh_server = server
            node.ssh_port = getattr(server, "port", None)
            node.host_public_key = getattr(server, "host_public_key", None)

    async def _lifecycle(self, job: JobRecord, spec: JobSpec, compute: ComputeState) -> None:
        try:
            await self._run(job, spec, compute)
        except Exception as exc:  # never leave a job hanging on an emulator bug
            logger.exception("job %s crashed in the emulator", job.name)
            if not job.is_terminal:
                self._finish(
                    job, "Failed", {"code": "SystemError", "message": f"emulator error: {exc!r}"}
                )
        finally:
            await self._teardown(job, compute)

    async def _run(self, job: JobRecord, spec: JobSpec, compute: ComputeState) -> None:
        await asyncio.sleep(0.05)
        max_nodes = compute.spec.max_nodes
        if job.instance_count > max_nodes:
            self._finish(
                job,
                "Failed",
                {
                    "code": "UserError",
                    "message": (
                        f"Requested {job.instance_count} nodes but AzureMLCompute cluster "
                        f"'{compute.spec.name}' only has {max_nodes} maximum nodes."
                    ),
                },
            )
            return
        demand = self.capacity.demand(compute)
        quota_error = (
            None if demand is None else self.capacity.job_quota_error(demand, job.instance_count)
        )
        if quota_error is not None:  # more vCPUs than a limit: AML fails the job, no queueing
            self._finish(job, "Failed", quota_error)
            return
        if await self._prepare(job, spec):
            await self._queue_and_run(job, spec, compute)

    def _ended_early(self, job: JobRecord) -> bool:
        """Finish a job canceled or failed (its compute deleted) before it ran; True if so."""
        if job.failure is not None:
            self._finish(job, "Failed", job.failure)
        elif job.cancel_reason is not None:
            self._finish_canceled(job)
        return job.is_terminal

    async def _prepare(self, job: JobRecord, spec: JobSpec) -> bool:
        """Preparing: the environment's build and the provisioning delay; False if it ended."""
        if job.cancel_reason is None and job.failure is None:
            job.status = "Preparing"
        deadline = time.monotonic() + self.provisioning_delay
        build = self._join_build(job, spec)
        while job.cancel_reason is None and job.failure is None:
            left = deadline - time.monotonic()
            if left <= 0 and (build is None or build.task.done()):
                break
            await self._pause(job, left if left > 0 else None)
        if job.failure is not None or job.cancel_reason is not None:
            await self._leave_build(job, build)
            return not self._ended_early(job)
        return build is None or self._take_build(job, build)

    async def _queue_and_run(self, job: JobRecord, spec: JobSpec, compute: ComputeState) -> None:
        """Queued until the compute has the nodes (and quota), then Running; again if requeued."""
        if job.cancel_reason is None and job.failure is None:
            job.status = "Queued"
            compute.queue.append(job.name)
            self._schedule()
        while job.slots is None and job.cancel_reason is None and job.failure is None:
            await self._pause(job, QUOTA_RECHECK if job.queue_reason else None)
            if job.slots is None and job.queue_reason:
                self._schedule()
        job.queue_reason = None
        if self._ended_early(job):
            return
        await self._make_nodes(job, compute)
        await self._start_ssh(compute, job)
        await self.job_services.start(job, spec.ssh_services, compute.spec.name, self.network)
        await self._run_nodes(job, spec)
        if job.requeue:  # preempted, run again: back to the queue on new nodes
            await self._release_nodes(job, compute)
            job.requeue = False
            job.attempts += 1
            await self._queue_and_run(job, spec, compute)

    async def _run_nodes(self, job: JobRecord, spec: JobSpec) -> None:
        ips = [n.ip for n in job.nodes]
        waiters: list[asyncio.Task] = []
        report = job.properties["properties"]["emulator.environment"].splitlines()
        if job.venv is not None:  # the report's last line names the shared interpreter
            report = [line for line in report if not line.startswith("nodes run ")]
            report.append(f"nodes run {os.path.join(job.venv, 'bin', 'python')} (built)")
            job.properties["properties"]["emulator.environment"] = "\n".join(report)
        header = "".join(f"[emulator] {line}\n" for line in [*job.notes, *report])
        await self.network.open(job.compute)  # the compute's network namespace, if isolated
        prefix = self.network.command_prefix(job.compute)
        # Running from the moment the user processes start (a node seen running means the
        # job is Running, never Preparing)
        job.status = "Running"
        job.start_time = time.time()
        for node in job.nodes:
            os.makedirs(os.path.dirname(node.log_path), exist_ok=True)
            with open(node.log_path, "a", encoding="utf-8") as log:
                log.write(header)
            env = nodeproc.node_base_environment(
                node_variables(
                    spec,
                    node.rank,
                    ips,
                    self.endpoints.node_tracking_uri or self.endpoints.tracking_uri,
                    self.endpoints.cert_path,
                    tracking_token=job.tracking_token,
                    trusted_ca=self.endpoints.node_ca_cert,
                ),
                venv=job.venv,
            )
            tee = await nodeproc.start_node(node, spec.command, env, prefix)
            assert node.pid is not None  # start_node set it
            self.reaper.watch(node.pid)
            waiters.append(asyncio.ensure_future(self._watch_node(job, node, tee)))
        deadline = None if job.timeout_seconds is None else time.monotonic() + job.timeout_seconds
        while True:
            if all(w.done() for w in waiters) or job.cancel_reason or job.failure or job.requeue:
                break
            if deadline is not None and time.monotonic() >= deadline:
                job.cancel_reason = "timeout"
                break
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            await self._pause(job, left)
        if not all(w.done() for w in waiters):
            if job.cancel_reason and job.status != "CancelRequested":
                job.status = "CancelRequested"
            await asyncio.gather(*(nodeproc.stop_node(n, KILL_GRACE) for n in job.nodes))
        await asyncio.gather(*waiters, return_exceptions=True)
        if not job.requeue:
            self._set_outcome(job)

    async def _watch_node(self, job: JobRecord, node: NodeRecord, tee: asyncio.Task) -> None:
        code = await nodeproc.wait_node(node, tee)
        assert node.pid is not None  # set by start_node, before this task
        self.reaper.forget(node.pid)
        node.state = "leaving" if node.state != "preempted" else node.state
        if code != 0 and job.failure is None and job.cancel_reason is None and not job.requeue:
            job.failure = self._node_failure(node, code)
        job.wake.set()

    def _node_failure(self, node: NodeRecord, code: int) -> dict[str, str]:
        return outcomes.node_failure_error(node, code, log_name(node.rank))

    def _finish_canceled(self, job: JobRecord) -> None:
        limit = (job.properties.get("limits") or {}).get("timeout")
        self._finish(
            job, "Canceled", outcomes.cancel_error(job.cancel_reason, limit, job.timeout_seconds)
        )

    def _set_outcome(self, job: JobRecord) -> None:
        if job.failure is not None:
            self._finish(job, "Failed", job.failure)
        elif job.cancel_reason is not None:
            self._finish_canceled(job)
        elif all(n.exit_code == 0 for n in job.nodes):
            self._finish(job, "Completed")
        else:  # pragma: no cover - every non-zero exit records a failure
            self._finish(job, "Failed", {"code": "UserError", "message": "a node failed"})

    async def _stop_nodes(self, job: JobRecord) -> None:
        """Stop a job's services, node processes and SSH endpoints."""
        await self.job_services.stop(job.name)
        for node in job.nodes:
            if node.process is not None and node.process.returncode is None:
                await nodeproc.stop_node(node, 0.5)
            if node.ssh_server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(node.ssh_server.close(), 5.0)
                node.ssh_server = None

    @staticmethod
    def _free_slots(job: JobRecord, compute: ComputeState) -> None:
        """Give a job's slots back; a preempted node's VM is gone (a new one comes next)."""
        lost = {n.slot for n in job.nodes if n.state == "preempted"}
        for slot in job.slots or []:
            compute.release(slot, lost=slot in lost)

    async def _release_nodes(self, job: JobRecord, compute: ComputeState) -> None:
        """Stop a job's nodes and give their slots back (before AML runs it again)."""
        await self._stop_nodes(job)
        self._free_slots(job, compute)
        job.slots = None
        job.nodes = []
        self._schedule()

    async def _teardown(self, job: JobRecord, compute: ComputeState) -> None:
        await self._stop_nodes(job)
        for node in job.nodes:
            if node.state != "preempted":
                node.state = "released"
        self._free_slots(job, compute)
        with contextlib.suppress(ValueError):
            compute.queue.remove(job.name)
        if not job.is_terminal:
            self._finish_canceled(job)
        job.done.set()
        if compute.serverless:  # a serverless job's nodes go with it
            self._drop_compute(compute)
        self._schedule()

    async def shutdown(self, timeout: float = 15.0) -> None:
        """Cancel every job, kill every node process group, close SSH endpoints.

        Parameters
        ----------
        timeout
            Upper bound for the orderly part; leftovers are SIGKILLed.
        """
        self._closing = True
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for job in self.jobs.values():
            if not job.is_terminal and job.cancel_reason is None:
                job.cancel_reason = "shutdown"
                job.wake.set()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for job in self.jobs.values():
            for node in job.nodes:
                nodeproc.signal_group(node, signal.SIGKILL)
                if node.ssh_server is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(node.ssh_server.close(), 2.0)
                    node.ssh_server = None
        for task in tasks:
            if not task.done():
                task.cancel()
        background = list(self._background)
        for task in background:
            task.cancel()
        if background:
            await asyncio.wait(background, timeout=KILL_GRACE)
        await self.job_services.close()
        await asyncio.to_thread(self.codes.close)
        await asyncio.to_thread(self.reaper.close)

    # ------------------------------------------------------- environment builds
    #: Builds environments with a conda file; None: every node runs on the emulator's
    #: own interpreter (``build_environments=False``, or an engine never configured).
    builder: EnvironmentBuilder | None = None

    def configure_builds(self, builder: EnvironmentBuilder | None) -> None:
        """Turn environment builds on (with ``builder``) or off (None).

        Parameters
        ----------
        builder
            Builds and caches the virtualenvs; its installer process groups are
            registered with the reaper.
        """
        self.builder = builder
        self._builds: dict[str, SharedBuild] = {}
        if builder is not None:
            reaper = self.reaper

            def track(pid: int, alive: bool) -> None:
                if alive:
                    reaper.watch(pid)
                else:
                    reaper.forget(pid)

            builder.on_process = track

    def _note(self, job: JobRecord, line: str) -> None:
        """Keep an ``[emulator]`` progress line for the node logs (they start with it)."""
        job.notes.append(line)

    def _write_build_log(self, job: JobRecord, lines: list[str], source: str | None) -> None:
        """Write the job's image build log: emulator lines, then the installer output."""
        path = job.build_log_path
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(f"[emulator] {line}\n" for line in lines)
            if source is not None:
                with (
                    contextlib.suppress(OSError),
                    open(source, encoding="utf-8", errors="replace") as src,
                ):
                    shutil.copyfileobj(src, out)

    def _job_environment(self, spec: JobSpec) -> tuple[str | None, Any]:
        """Image and conda file of a job's environment (None, None when unresolvable)."""
        ref = environment_reference(spec.properties["environmentId"])
        env = self.environments.get(ref[0], {}).get(ref[1]) if ref is not None else None
        props = env.properties if env is not None else {}
        return props.get("image"), props.get("condaFile")

    def _join_build(self, job: JobRecord, spec: JobSpec) -> SharedBuild | None:
        """Start (or join) the build of the job's environment; None when nothing is built."""
        image, conda_file = self._job_environment(spec)
        own = f"{sys.executable} (Python {'.'.join(map(str, sys.version_info[:3]))})"
        if self.builder is None:
            if conda_file:
                self._note(
                    job,
                    "environment builds are off (build_environments=False): nodes run the "
                    f"emulator's own interpreter {own} and its site-packages",
                )
            return None
        plan = plan_build(image, conda_file)
        if plan is None:
            self._note(
                job,
                f"environment has no conda file (image {image or '-'} only): nodes run the "
                f"emulator's own interpreter {own} and its site-packages as a stand-in "
                "for the image",
            )
            return None
        job.build_log_path = os.path.join(self.workdir, "jobs", job.name, "logs", BUILD_LOG_NAME)
        self._write_build_log(job, [f"building environment {plan.key} ..."], None)
        shared = self._builds.get(plan.key)
        if shared is None or shared.task.done():
            shared = SharedBuild(
                plan=plan,
                task=asyncio.ensure_future(self._build(plan)),
                waiters=set(),
                started=time.monotonic(),
            )
            self._builds[plan.key] = shared
            shared.task.add_done_callback(functools.partial(self._build_done, shared))
        shared.waiters.add(job.name)
        self._note(job, f"building environment {plan.key} ...")
        return shared

    async def _build(self, plan: BuildPlan) -> BuildResult:
        assert self.builder is not None  # only called with builds on
        return await self.builder.build(plan)

    def _build_done(self, shared: SharedBuild, _task: asyncio.Future[BuildResult]) -> None:
        """Wake the jobs waiting for a build; a later job starts a fresh (cached) one."""
        if self._builds.get(shared.plan.key) is shared:
            del self._builds[shared.plan.key]
        for name in shared.waiters:
            job = self.jobs.get(name)
            if job is not None:
                job.wake.set()

    async def _leave_build(self, job: JobRecord, shared: SharedBuild | None) -> None:
        """A job stops waiting for a build; the last one to leave stops the build."""
        if shared is None:
            return
        shared.waiters.discard(job.name)
        if shared.waiters or shared.task.done():
            return
        shared.task.cancel()  # the builder stops its installer process group
        await asyncio.wait([shared.task], timeout=KILL_GRACE + 10.0)
        self._write_build_log(
            job,
            [f"building environment {shared.plan.key} ...", "build stopped: job canceled"],
            None,
        )

    def _take_build(self, job: JobRecord, shared: SharedBuild) -> bool:
        """Record a finished build on the job; False when it failed (the job is then Failed)."""
        shared.waiters.discard(job.name)
        task = shared.task
        key = shared.plan.key
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            reason = "the build was stopped" if task.cancelled() else str(error)
            if error is not None and not isinstance(error, EnvironmentBuildError):
                logger.error("building environment %s crashed", key, exc_info=error)
            self._note(job, f"building environment {key} failed: {reason}")
            log = None if self.builder is None else str(self.builder.root / key / "build.log")
            self._write_build_log(
                job, [f"building environment {key} ...", f"build failed: {reason}"], log
            )
            self._finish(job, "Failed", {"code": "UserError", "message": BUILD_FAILED_MESSAGE})
            # AML's error carries the message format and an inner error code as well.
            job.error = {
                "code": "UserError",
                "message": BUILD_FAILED_MESSAGE,
                "messageFormat": BUILD_FAILED_FORMAT,
                "messageParameters": {"ArtifactPath": BUILD_LOG_NAME},
                "innerError": {"code": "BadArgument"},
            }
            return False
        result = task.result()
        if result.reused:
            line = f"reused cached build of environment {key} ({result.venv})"
        else:
            line = f"built environment {key} in {time.monotonic() - shared.started:.1f}s"
        self._note(job, line)
        self._write_build_log(job, [f"building environment {key} ...", line], result.log_path)
        job.venv = result.venv
        return True
