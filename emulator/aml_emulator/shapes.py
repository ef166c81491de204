"""JSON shapes of the ARM and run-history payloads the azure-ai-ml SDK reads.

Field names follow the REST API as the SDK (1.35.x) deserializes it: jobs with
api-version 2024-01-01-preview (GET) and 2025-01-01-preview (PUT), computes,
VM sizes and usages 2023-08-01-preview, environments 2023-04-01-preview, workspace
2024-10-01-preview, run history ``/history/v1.0``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from . import identity
from .capacity import DEDICATED, LOW_PRIORITY, Capacity, usage_name
from .config import VmSizeSpec
from .identity import system_data, utcnow_iso
from .state import ComputeState, EnvironmentVersion, JobRecord

#: ``osVhdSizeMB`` of every size in azure-rest-api-specs' VirtualMachineSize list example.
OS_VHD_SIZE_MB = 1047552


def arm_error(code: str, message: str) -> dict[str, Any]:
    """Return an ARM error body.

    Parameters
    ----------
    code
        Error code (``NotFound``, ``BadRequest``, ``UserError``...).
    message
        Human-readable message.

    Returns
    -------
    dict
        ``{"error": {"code": ..., "message": ...}}``.
    """
    return {"error": {"code": code, "message": message, "details": [], "additionalInfo": []}}


def seconds_to_iso_duration(seconds: float) -> str:
    """Format seconds as an ISO 8601 duration.

    Parameters
    ----------
    seconds
        Duration.

    Returns
    -------
    str
        e.g. ``PT120S``.
    """
    return f"PT{int(seconds)}S"


def job_to_rest(job: JobRecord, tracking_uri: str, run_tags: bool = True) -> dict[str, Any]:
    """Return the job resource as AML returns it from ``GET /jobs/{name}``.

    The submitted ``properties`` are echoed back (environment, command,
    distribution, resources, limits, environment variables, experiment...),
    with ``status``, merged tags and ``services`` (the declared ones as sent, plus
    ``Tracking`` and ``Studio``) filled in by the service.

    Parameters
    ----------
    job
        The job.
    tracking_uri
        MLflow tracking URI reported as the ``Tracking`` service endpoint.
    run_tags
        Include the tags set through mlflow (run history) with the submitted ones.

    Returns
    -------
    dict
        The ``JobBase`` resource.
    """
    props = dict(job.properties)
    props["status"] = job.status
    props["tags"] = job.tags if run_tags else dict(job.properties.get("tags") or {})
    props.setdefault("displayName", job.name)
    props.setdefault("experimentName", "Default")
    props.setdefault("isArchived", False)
    props["properties"] = dict(props.get("properties") or {})
    props["properties"].setdefault("_azureml.ComputeTargetType", "amlctrain")
    if job.queue_reason and job.status == "Queued":  # why the job waits (see capacity.py)
        props["properties"]["emulator.queueReason"] = job.queue_reason
    props["services"] = {
        **(props.get("services") or {}),  # the declared ones (SSH, JupyterLab, ...) as sent
        "Tracking": {"jobServiceType": "Tracking", "endpoint": tracking_uri},
        "Studio": {"jobServiceType": "Studio", "endpoint": identity.studio_url(job.name)},
    }
    return {
        "id": identity.child_id("jobs", job.name),
        "name": job.name,
        "type": f"{identity.PROVIDER}/workspaces/jobs",
        "properties": props,
        "systemData": system_data(job.created, job.end_time or job.start_time),
    }


def compute_to_rest(compute: ComputeState) -> dict[str, Any]:
    """Return the compute resource as ``GET /computes/{name}`` does.

    Parameters
    ----------
    compute
        The compute.

    Returns
    -------
    dict
        The ``ComputeResource``.
    """
    spec = compute.spec
    created = utcnow_iso(compute.created)
    outer: dict[str, Any] = {
        "computeType": spec.kind,
        "computeLocation": identity.REGION,
        "provisioningState": compute.provisioning_state,
        "provisioningErrors": None,
        "createdOn": created,
        "modifiedOn": created,
        "isAttachedCompute": spec.kind not in ("AmlCompute", "ComputeInstance"),
        "disableLocalAuth": True,
        "description": "Emulated compute (dask-amlcompute local emulator)",
    }
    if spec.kind == "AmlCompute":
        running = sum(1 for s in compute.slots if s is not None)
        idle = len(compute.idle_slots())
        inner: dict[str, Any] = {
            "osType": "Linux",
            "vmSize": spec.vm_size,
            "vmPriority": spec.vm_priority,
            "scaleSettings": {
                "maxNodeCount": spec.max_nodes,
                "minNodeCount": spec.min_nodes,
                "nodeIdleTimeBeforeScaleDown": seconds_to_iso_duration(
                    spec.idle_seconds_before_scaledown
                ),
            },
            "remoteLoginPortPublicAccess": "Enabled" if spec.ssh_public_access else "Disabled",
            "allocationState": "Steady",
            "allocationStateTransitionTime": created,
            "currentNodeCount": running + idle,
            "targetNodeCount": running + idle,
            "nodeStateCounts": {
                "idleNodeCount": idle,
                "runningNodeCount": running,
                "preparingNodeCount": 0,
                "unusableNodeCount": 0,
                "leavingNodeCount": 0,
                "preemptedNodeCount": 0,
            },
            "enableNodePublicIp": True,
            "isolatedNetwork": False,
        }
        if spec.admin_user:
            inner["userAccountCredentials"] = {
                "adminUserName": spec.admin_user,
                "adminUserSshPublicKey": spec.ssh_public_keys[0] if spec.ssh_public_keys else None,
            }
        outer["properties"] = inner
    elif spec.kind == "ComputeInstance":
        inner = {
            "vmSize": spec.vm_size,
            "state": "Running",
            "applicationSharingPolicy": "Personal",
            "computeInstanceAuthorizationType": "personal",
            "connectivityEndpoints": {
                "publicIpAddress": "127.0.0.1",
                "privateIpAddress": compute.ip_for_slot(0),
            },
        }
        if spec.admin_user and spec.ssh_public_keys:
            inner["sshSettings"] = {
                "sshPublicAccess": "Enabled" if spec.ssh_public_access else "Disabled",
                "adminUserName": spec.admin_user,
                "adminPublicKey": spec.ssh_public_keys[0],
                "sshPort": 50000,
            }
        outer["properties"] = inner
    else:
        outer["properties"] = {}
    return {
        "id": identity.child_id("computes", spec.name),
        "name": spec.name,
        "type": f"{identity.PROVIDER}/workspaces/computes",
        "location": identity.REGION,
        "tags": {},
        "properties": outer,
        "systemData": system_data(compute.created),
    }


def environment_to_rest(env: EnvironmentVersion) -> dict[str, Any]:
    """Return an environment version resource.

    Parameters
    ----------
    env
        The environment version.

    Returns
    -------
    dict
        The ``EnvironmentVersion`` resource.
    """
    props = {
        "isAnonymous": False,
        "isArchived": False,
        "osType": "Linux",
        "environmentType": "UserCreated",
        "tags": {},
        "properties": {},
    }
    props.update(env.properties)
    props.setdefault("image", None)
    return {
        "id": identity.child_id("environments", env.name, "versions", env.version),
        "name": env.version,
        "type": f"{identity.PROVIDER}/workspaces/environments/versions",
        "properties": props,
        "systemData": system_data(env.created),
    }


def environment_container_to_rest(name: str, versions: list[EnvironmentVersion]) -> dict[str, Any]:
    """Return an environment container resource (``GET /environments[/{name}]``).

    Parameters
    ----------
    name
        Environment name.
    versions
        Its versions (at least one).

    Returns
    -------
    dict
        The ``EnvironmentContainer`` resource: ``properties.latestVersion`` is the
        most recently created version, which ``Environment._from_container_rest_object``
        reads as ``latest_version``.
    """
    latest = max(versions, key=lambda e: e.created)
    first = min(versions, key=lambda e: e.created)
    return {
        "id": identity.child_id("environments", name),
        "name": name,
        "type": f"{identity.PROVIDER}/workspaces/environments",
        "properties": {
            "latestVersion": latest.version,
            "nextVersion": None,
            "isArchived": False,
            "description": None,
            "tags": {},
            "properties": {},
        },
        "systemData": system_data(first.created, latest.created),
    }


def workspace_to_rest(api_host: str, tracking_uri: str) -> dict[str, Any]:
    """Return the workspace resource.

    Parameters
    ----------
    api_host
        Host the discovery document points the data-plane clients at.
    tracking_uri
        MLflow tracking URI (plain ``http(s)`` to the emulator, not ``azureml://``).

    Returns
    -------
    dict
        The ``Workspace`` resource.
    """
    return {
        "id": identity.workspace_id(),
        "name": identity.WORKSPACE_NAME,
        "type": f"{identity.PROVIDER}/workspaces",
        "location": identity.REGION,
        "kind": "Default",
        "tags": {},
        "sku": {"name": "Basic", "tier": "Basic"},
        "identity": {"type": "SystemAssigned"},
        "properties": {
            "friendlyName": identity.WORKSPACE_NAME,
            "description": "dask-amlcompute local emulator",
            "workspaceId": "00000000-0000-0000-0000-0000000000ee",
            "discoveryUrl": f"https://{api_host}/discovery",
            "mlFlowTrackingUri": tracking_uri,
            "provisioningState": "Succeeded",
            "publicNetworkAccess": "Disabled",
            "hbiWorkspace": False,
            "v1LegacyMode": False,
        },
        "systemData": system_data(time.time()),
    }


def discovery_document(api_host: str) -> dict[str, str]:
    """Return the workspace discovery document.

    Parameters
    ----------
    api_host
        Host for every data-plane service.

    Returns
    -------
    dict
        Service name to base URL.
    """
    base = f"https://{api_host}"
    return {
        k: base
        for k in (
            "api",
            "catalog",
            "experimentation",
            "gallery",
            "history",
            "hyperdrive",
            "labeling",
            "modelmanagement",
            "pipelines",
            "studio",
        )
    }


def run_details(job: JobRecord, log_urls: dict[str, str]) -> dict[str, Any]:
    """Return run-history ``RunDetails`` for a job.

    Parameters
    ----------
    job
        The job.
    log_urls
        Log file name (e.g. ``user_logs/std_log_process_0.txt``) to URL.

    Returns
    -------
    dict
        ``RunDetails`` with ``status``, ``error`` and ``logFiles``.
    """
    out: dict[str, Any] = {
        "runId": job.name,
        "runUuid": job.name,
        "target": job.compute,
        "status": job.status,
        "createdTimeUtc": utcnow_iso(job.created),
        "startTimeUtc": utcnow_iso(job.start_time) if job.start_time else None,
        "endTimeUtc": utcnow_iso(job.end_time) if job.end_time else None,
        "tags": job.tags,
        "properties": dict(job.properties.get("properties") or {}),
        "logFiles": log_urls,
        "warnings": [dict(w) for w in job.warnings],
        "services": {},
    }
    if job.error:
        out["error"] = {"error": dict(job.error)}
    return out


def run_record(job: JobRecord) -> dict[str, Any]:
    """Return a run-history ``Run`` for a job (``GET /runs/{id}``).

    Parameters
    ----------
    job
        The job.

    Returns
    -------
    dict
        A minimal ``Run``.
    """
    out = run_details(job, {})
    out.pop("logFiles")
    out.update(
        {
            "runType": "azureml.scriptrun",
            "displayName": job.display_name,
            "experimentId": job.experiment_name,
            "computeRequest": {"nodeCount": job.instance_count},
        }
    )
    return out


def vm_size_to_rest(size: VmSizeSpec) -> dict[str, Any]:
    """Return a ``VirtualMachineSize`` as ``GET .../locations/{loc}/vmSizes`` lists it.

    Shape of azure-rest-api-specs ``machinelearningservices`` 2023-08-01-preview
    ``examples/VirtualMachineSize/list.json``: ``estimatedVMPrices`` (USD per
    ``OneHour``, one value per ``vmTier`` for ``osType`` Linux) is left out for a
    size without prices.

    Parameters
    ----------
    size
        The catalogue entry.

    Returns
    -------
    dict
        The size.
    """
    out: dict[str, Any] = {
        "name": size.name,
        "family": size.family,
        "vCPUs": size.vcpus,
        "gpus": size.gpus,
        "osVhdSizeMB": OS_VHD_SIZE_MB,
        "maxResourceVolumeMB": size.max_resource_volume_mb,
        "memoryGB": size.memory_gb,
        "lowPriorityCapable": size.low_priority_capable,
        "premiumIO": size.premium_io,
        "supportedComputeTypes": list(size.supported_compute_types),
    }
    if size.prices:
        out["estimatedVMPrices"] = {
            "billingCurrency": "USD",
            "unitOfMeasure": "OneHour",
            "values": [
                {"retailPrice": price, "osType": "Linux", "vmTier": tier}
                for tier, price in size.prices.items()
            ],
        }
    return out


def _usage(
    arm_id: str, kind: str, name: str, current: int, limit: int, value: str | None = None
) -> dict[str, Any]:
    return {
        "id": arm_id,
        "amlWorkspaceLocation": identity.REGION,
        "type": f"{identity.PROVIDER}/{kind}/usages",
        "unit": "Count",
        "currentValue": current,
        "limit": limit,
        "name": {"value": value or name, "localizedValue": name},
    }


def usages_to_rest(capacity: Capacity, computes: Iterable[ComputeState]) -> list[dict[str, Any]]:
    """Return the ``value`` of ``GET .../locations/{loc}/usages``.

    Entries as azure-rest-api-specs ``machinelearningservices`` 2023-08-01-preview
    ``examples/Usage/list.json`` has them: ``Clusters`` (type ``totalCores``), per
    tier the regional total (``dedicatedCores`` / ``lowPriorityCores``, named
    ``Total Cluster Dedicated Regional vCPUs``) then one ``vmFamily`` entry per
    family (``Standard DSv2 Family Cluster Dedicated vCPUs``, id segment
    ``Standard_DSv2_Family_Cluster_Dedicated_vCPUs``; low-priority families have
    limit -1, no per-family limit), each followed, when the workspace has computes
    of that family and tier, by a ``workspaces`` entry and one ``workspaces/computes``
    entry per compute (serverless jobs together as compute ``Serverless``, as the
    portal names their usage).  Values count the vCPUs of allocated nodes.

    Parameters
    ----------
    capacity
        Sizes and limits.
    computes
        Every compute, serverless pools included.

    Returns
    -------
    list of dict
        The usages.
    """
    computes = list(computes)
    sub = f"/subscriptions/{identity.SUBSCRIPTION_ID}"
    used = capacity.usage(computes)
    named = [c for c in computes if not c.serverless and c.spec.runs_jobs]
    out = [_usage(f"{sub}/usages", "totalCores", "Clusters", len(named), capacity.max_computes)]
    for tier, kind in ((DEDICATED, "dedicatedCores"), (LOW_PRIORITY, "lowPriorityCores")):
        total = usage_name(None, tier)
        out.append(
            _usage(f"{sub}/usages", kind, total, used[(None, tier)], capacity.limit(None, tier))
        )
        for family in capacity.families():
            name = usage_name(family, tier)
            segment = name.replace(" ", "_")
            limit = capacity.limit(family, tier)
            current = used.get((family.lower(), tier), 0)
            value = family if capacity.family_value == "id" else None
            arm_id = f"{sub}/usages/{segment}"
            out.append(_usage(arm_id, "vmFamily", name, current, limit, value))
            per_compute: dict[str, int] = {}
            for compute in computes:
                demand = capacity.demand(compute)
                if demand is None or demand.family.lower() != family.lower() or demand.tier != tier:
                    continue
                label = "Serverless" if compute.serverless else compute.spec.name
                vcpus = compute.allocated * demand.vcpus_per_node
                per_compute[label] = per_compute.get(label, 0) + vcpus
            if not per_compute:
                continue
            ws = identity.workspace_id()
            out.append(_usage(f"{ws}/usages/{segment}", "workspaces", name, current, limit))
            for label, vcpus in per_compute.items():
                arm_id = f"{ws}/computes/{label}/usages/{segment}"
                out.append(_usage(arm_id, "workspaces/computes", name, vcpus, limit))
    return out
