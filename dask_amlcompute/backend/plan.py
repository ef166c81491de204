"""The cluster's plan (:class:`~.state.ClusterPlan`): decided once, before anything is submitted.

:func:`draft_plan` fixes what needs no workspace; :func:`plan_cluster` the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from .._protocol import main_job_name
from ..config import ClusterSettings
from ..connect import JOB_SERVICE_MODES, available_paths, unavailable_paths
from ..exceptions import (
    ComputeNotFoundError,
    ConfigurationError,
    QuotaExceededError,
    TooManyNodesError,
)
from .capacity import (
    QUOTA_DOCS,
    Quota,
    QuotaCheck,
    VmSizeInfo,
    check_quota,
    describe_price,
    find_size,
    quotas_for,
    size_from_sdk,
)
from .daskcuda import NO_SSH_SERVER
from .environment import environment_from_settings, library_in_snapshot, local_packages
from .ops import AmlOps, ComputeInfo
from .snapshot import stage_snapshot
from .state import ClusterPlan

logger = logging.getLogger(__name__)

#: Seconds to wait for one look-up (VM sizes, quota).
LOOKUP_TIMEOUT = 30.0
#: Bound on creating or deleting a compute (AML: usually 1-3 minutes).
COMPUTE_TIMEOUT = 900.0


def draft_plan(
    settings: ClusterSettings, code: str | os.PathLike | None, mode: Literal["create", "attach"]
) -> ClusterPlan:
    """What needs no workspace: the environment, the staged code snapshot, the job SSH key."""
    snapshot = stage_snapshot(
        code,
        include_library=library_in_snapshot(settings.node_package, settings.pip_packages),
        packages=local_packages(settings.stack, settings.pip_packages)
        if settings.environment is None
        else (),
    )
    key = None
    if settings.connect in JOB_SERVICE_MODES and (settings.ssh_key or mode == "create"):
        from ..connect.jobservice import cluster_key

        key = cluster_key(settings.ssh_key)  # the main job's SSH service accepts it (in memory)
    return ClusterPlan(
        mode=mode,
        environment=environment_from_settings(settings),
        code=str(snapshot) if snapshot else None,
        job_ssh_key=key,
    )


async def plan_cluster(
    settings: ClusterSettings, ops: AmlOps, draft: ClusterPlan, log: Callable[[str], None]
) -> ClusterPlan:
    """The compute (created if asked), name, environment, quota, price, GPUs, connect path.

    The first failing check raises; a new cluster's code and environment are registered.
    """
    return await _Planner(settings, ops, log, draft).plan()


@dataclass
class _Planner:
    settings: ClusterSettings
    ops: AmlOps
    log: Callable[[str], None]
    plan_: ClusterPlan

    @property
    def attach(self) -> bool:
        return self.plan_.mode == "attach"

    def update(self, **changes: Any) -> None:
        self.plan_ = replace(self.plan_, **changes)

    async def plan(self) -> ClusterPlan:
        """Look-ups at once; code and environment registered before the job PUT (issue 28)."""
        s, create, code = self.settings, not self.attach, self.plan_.code
        registered = asyncio.ensure_future(
            self.ops.register_code(code) if create and code else asyncio.sleep(0, code)
        )
        try:
            results = await asyncio.gather(
                self._find_or_create_compute(),
                self._worker_compute(s.worker_compute) if s.worker_compute else asyncio.sleep(0),
                self._check_name_is_new() if create else asyncio.sleep(0),
                self.ops.check_environment(s.environment)
                if create and isinstance(s.environment, str)
                else asyncio.sleep(0),
                self.ops.list_sizes(),  # read ahead for _check_capacity (its failure shows there)
                self.ops.list_usage() if create else asyncio.sleep(0),
                return_exceptions=True,
            )
            if error := next((r for r in results[:4] if isinstance(r, BaseException)), None):
                raise error
            self.update(compute=results[0], worker_compute=results[1])
            await self._check_capacity(results[0])
            self._use_gpus()
            self._check_connect_path()
            env = self.plan_.environment
            if create and not isinstance(env, str):  # one read from AML has its id: as the SDK
                env = env.id or await self.ops.register_environment(env)
            self.update(environment=env, code=await registered)
        finally:
            registered.cancel()  # a check failed: the snapshot's upload is not waited for
            await asyncio.gather(registered, return_exceptions=True)
        return self.plan_

    async def _check_name_is_new(self) -> None:
        """AML job names are unique forever: refuse a cluster name used before."""
        main_job = main_job_name(self.settings.name)
        if await self.ops.get_job_entity(main_job) is not None:
            raise ConfigurationError(
                f"A cluster named {self.settings.name!r} existed already in this workspace (AML "
                f"job {main_job}), and AML never reuses a job name. Pick another "
                "name, leave name unset for a fresh one, or reconnect to a running cluster with "
                "AmlComputeCluster.from_name(name). Nothing was submitted."
            )

    def _check_connect_path(self) -> None:
        """Refuse a ``connect=`` that cannot work on this compute, before any node is paid for."""
        mode, default_env = self.settings.connect, self.settings.environment is None
        if mode in ("job-ssh", "auto") and self.plan_.gpus_per_node and default_env:
            # the default GPU environment's image may lack the job SSH service's sshd
            way_out = (
                "connect='direct' from inside the workspace's network (e.g. a compute instance), "
                "environment= an image with openssh-server (`dask-amlcompute env --gpu --format "
                "dockerfile` writes one), or gpu_workers='none' (CPU image, which has it)"
            )
            if mode == "job-ssh":
                raise ConfigurationError(
                    f"connect='job-ssh' cannot work with the default GPU environment: "
                    f"{NO_SSH_SERVER}. Use {way_out}. Nothing was submitted."
                )
            self.log(
                f"GPU nodes: only the direct connection can work ({NO_SSH_SERVER}); from outside "
                f"the workspace's network use {way_out}"
            )
        missing = unavailable_paths(self.plan_)  # direct and auto may work
        if mode in ("job-ssh", "ssh") and mode in missing:
            usable = ", ".join(repr(p) for p in available_paths(self.plan_))
            raise ConfigurationError(
                f"connect={mode!r} cannot work on compute {self.settings.compute!r}: it needs "
                f"{missing[mode]}. Use connect='auto' (tries direct, then the job's SSH service"
                f"{'; usable here: ' + usable if usable else ''}). Nothing was submitted."
            )

    async def _find_or_create_compute(self) -> ComputeInfo:
        """The compute; created first when it does not exist and ``create_compute`` says how."""
        ops, request, name = self.ops, self.settings.create_compute, self.settings.compute
        if name is None:
            return await self._serverless_compute()
        try:
            compute = await ops.get_compute(name)
        except ComputeNotFoundError:
            if request is None or self.attach:
                raise
        else:
            if request is not None and not self.attach:
                kept = "; it will not be deleted on close" * self.settings.delete_compute_on_close
                self.log(
                    f"Compute {name} exists: using it as it is (create_compute applies only to "
                    f"a compute that does not exist{kept})"
                )
            return compute
        assert request is not None  # re-raised above otherwise
        size = await self._offered_size(request.size, "create_compute: VM size", "created")
        self._refuse_over_quota(size, quotas_for(await ops.list_usage(), size.family, request.tier))
        self.log(
            f"Creating AmlCompute {name}: {size.name} ({size.vcpus} vCPUs), 0-{request.max_nodes} "
            f"nodes, {request.tier.replace('_', '-')}, idle nodes released after "
            f"{request.idle_seconds}s; {describe_price(size, request.tier, 1).split(',')[0]}"
        )
        started = time.monotonic()
        await ops.create_compute(
            name, size.name, request.max_nodes, request.tier, request.idle_seconds, COMPUTE_TIMEOUT
        )
        self.update(created_compute=True)
        self.log(f"Created AmlCompute {name} in {time.monotonic() - started:.1f}s")
        return await ops.get_compute(name)

    async def _worker_compute(self, name: str) -> ComputeInfo:
        """The compute of the extra worker jobs (``worker_compute``), with its size and price."""
        compute = await self.ops.get_compute(name)
        size, _ = await self._read_capacity(compute, quota=False)
        price = describe_price(size, compute.tier, self.settings.nodes_per_job)
        spot = "; a preempted worker job is replaced by scale/adapt" * (
            compute.tier == "low_priority"
        )
        self.log(
            f"Worker jobs on compute {name} ({compute.tier.replace('_', '-')}, up to "
            f"{compute.max_nodes} nodes): {price} per job{spot}"
        )
        return compute

    async def _offered_size(self, name: str, what: str, nothing: str) -> VmSizeInfo:
        """The region's VM size called ``name``; ConfigurationError listing some when it has none."""
        sizes = [size_from_sdk(s) for s in await self.ops.list_sizes()]
        size = find_size(sizes, name)
        if size is None:
            offered = ", ".join(sorted(s.name for s in sizes)[:12]) or "none listed"
            raise ConfigurationError(
                f"{what} {name!r} is not offered in this workspace's region. Sizes offered "
                f"include: {offered}. Nothing was {nothing}."
            )
        return size

    async def _serverless_compute(self) -> ComputeInfo:
        """What serverless jobs of ``instance_type`` run on: checked against the region's sizes."""
        settings = self.settings
        assert settings.instance_type is not None  # serverless
        size = await self._offered_size(settings.instance_type, "instance_type", "submitted")
        if settings.job_tier == "spot" and not size.low_priority_capable:
            raise ConfigurationError(
                f"instance_type {size.name!r} has no Spot (low-priority) VMs: use "
                "job_tier='standard' or another size. Nothing was submitted."
            )
        self.log(
            f"Serverless: {settings.n_nodes} x {size.name} ({settings.job_tier}); AML allocates "
            "the nodes for this job and releases them when it ends"
        )
        return ComputeInfo(
            name="serverless",
            type="serverless",
            vm_size=size.name,
            node_public_ip=False,
            tier="spot" if settings.job_tier == "spot" else "dedicated",
        )

    def _refuse_over_quota(self, size: VmSizeInfo, quotas: list[Quota]) -> QuotaCheck:
        """Raise :class:`QuotaExceededError` when ``n_nodes`` of ``size`` can never fit."""
        n = self.settings.n_nodes
        check = check_quota(quotas, n * size.vcpus)
        if check.never is not None:
            q = check.never
            raise QuotaExceededError(
                f"{n} node(s) of {size.name} need {check.vcpus} vCPUs, more than the region's "
                f"quota '{q.name}' of {q.limit} vCPUs ({q.used} in use): the job could never "
                f"start. Ask for at most {(q.limit or 0) // max(1, size.vcpus)} node(s) or a "
                "smaller size, or request more quota (Azure portal > Quotas > Azure Machine "
                f"Learning; {QUOTA_DOCS}). Nothing was submitted."
            )
        return check

    async def _check_capacity(self, compute: ComputeInfo) -> None:
        """Refuse what can never run (nodes, quota) and show the size and price, before submitting."""
        n = self.settings.n_nodes
        if compute.max_nodes and n > compute.max_nodes:
            raise TooManyNodesError(
                f"n_nodes={n} but compute {compute.name!r} has at most {compute.max_nodes} "
                f"node(s) (max_instances). Ask for at most {compute.max_nodes} nodes or raise "
                "the compute's maximum; nothing was submitted."
            )
        size, quotas = await self._read_capacity(compute, quota=not self.attach)
        self.update(vm_size=size, price=describe_price(size, compute.tier, n))
        if size is None:
            self.log(f"Compute {compute.name}: {n} node(s) of {compute.vm_size}; price unknown")
            return
        gpus = f", {size.gpus} GPU(s)" if size.gpus else ""
        self.log(
            f"Compute {compute.name}: {n} x {size.name} ({size.vcpus} vCPUs{gpus}, "
            f"{compute.tier.replace('_', '-')}): {self.plan_.price}"
        )
        check = self._refuse_over_quota(size, quotas)
        if check.full is not None:
            q = check.full
            self.update(
                queue_hint=f"waiting for vCPU quota: {check.vcpus} needed, {q.free} of {q.limit} "
                f"free in '{q.name}' when it was submitted"
            )
            self.log(
                f"Quota: {check.vcpus} vCPUs needed but '{q.name}' has {q.free} of {q.limit} "
                f"free ({q.used} in use by other jobs or allocated nodes): the job may wait in "
                "Queued until enough nodes are released."
            )

    def _use_gpus(self) -> None:
        """On a GPU size: one dask-cuda worker per GPU, and the CUDA image for the default env."""
        settings, size = self.settings, self.plan_.vm_size
        if self.attach or size is None or not size.gpus or settings.gpu_workers == "none":
            return
        self.update(gpus_per_node=size.gpus)
        cuda = ""
        if settings.environment is None:
            self.update(environment=environment_from_settings(settings, gpu=True))
            cuda = "; default environment on AML's CUDA base image"
        self.log(
            f"GPU size {size.name}: {size.gpus} GPU(s) per node, one dask-cuda worker per GPU "
            f"(resources={{'GPU': 1}}){cuda}"
        )

    async def _read_capacity(
        self, compute: ComputeInfo, quota: bool
    ) -> tuple[VmSizeInfo | None, list[Quota]]:
        """The compute's VM size and its quota lines; (None, []) when AML does not say."""
        try:
            sizes = await asyncio.wait_for(self.ops.list_sizes(), LOOKUP_TIMEOUT)
            size = find_size((size_from_sdk(s) for s in sizes), compute.vm_size)
            if size is None or not quota:
                return size, []
            usages = await asyncio.wait_for(self.ops.list_usage(), LOOKUP_TIMEOUT)
            return size, quotas_for(usages, size.family, compute.tier)
        except Exception as exc:  # sizes and quota only inform: never block a start on them
            logger.info("Could not read VM sizes / quota of the region: %s", exc)
            return None, []
