"""HTTP routes of computes, VM sizes and usages: list, get, create, delete, operations.

Paths and methods are those of azure-ai-ml 1.35 (``_restclient/arm_ml_service``,
``ComputeOperations``, ``VirtualMachineSizesOperations``, ``UsagesOperations``;
``ml_client.compute`` passes api-version 2023-08-01-preview):

* ``GET .../workspaces/{ws}/computes`` and ``GET .../computes/{name}``;
* ``PUT .../computes/{name}`` (``compute.begin_create_or_update``): a new compute
  answers 201 with ``provisioningState: Creating`` and an ``Azure-AsyncOperation``
  header (azure-rest-api-specs ``examples/Compute/createOrUpdate/BasicAmlCompute.json``),
  whose ``.../locations/{loc}/computeOperationsStatus/{id}`` (a resource type of the
  provider, Microsoft Learn *Move operation support for resources*) reports
  ``InProgress`` then ``Succeeded``; the SDK's ARM poller then GETs the compute.
  An existing ``AmlCompute`` is updated in place (scale settings) and answers 200;
* ``DELETE .../computes/{name}?underlyingResourceAction=Delete|Detach``
  (``compute.begin_delete``): 202 with ``Azure-AsyncOperation`` and ``Location``
  (``examples/Compute/delete.json``), the compute ``Deleting`` until it is gone;
* ``GET /subscriptions/{sub}/providers/Microsoft.MachineLearningServices/locations/
  {loc}/vmSizes`` (``compute.list_sizes``) and ``.../usages`` (``compute.list_usage``),
  shapes in :mod:`~aml_emulator.shapes`, numbers from
  :mod:`~aml_emulator.capacity`.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import identity, shapes
from .capacity import tier_of
from .config import ComputeSpec
from .engine import Engine
from .errors import ApiError
from .handlers import BaseHandler, ServerContext
from .jobspec import parse_duration
from .state import ComputeState

#: api-version ``ml_client.compute`` uses (``ServiceClient082023Preview``).
API_VERSION = "2023-08-01-preview"
#: A compute's name: Microsoft Learn *Create compute clusters* ("between 3 to 24
#: characters long ... letters, digits, and the - character ... must start with a letter").
_COMPUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,22}[A-Za-z0-9]$")
#: AML's refusal, as reported in aztfmod/terraform-provider-azurecaf#78 and (the dash
#: rule) MicrosoftLearning/mslearn-mlops#7.
NAME_RULES = (
    "Compute name is invalid. It can include letters, digits and dashes. It must start with "
    "a letter, end with a letter or digit, and be between 3 and 24 characters in length. "
    "'-' needs to be followed by at least one letter."
)


def check_compute_name(name: str) -> None:
    """Refuse a compute name AML refuses (400 ``BadRequest``).

    Parameters
    ----------
    name
        The name in the URL.

    Raises
    ------
    ApiError
        400 naming the rules.
    """
    after_dash = name.rsplit("-", 1)[1] if "-" in name else "x"
    if not _COMPUTE_NAME.match(name) or not re.search(r"[A-Za-z]", after_dash):
        raise ApiError(400, "BadRequest", f"{NAME_RULES} Got '{name}'.")


def compute_spec_from_rest(name: str, body: Any, engine: Engine) -> ComputeSpec:
    """Validate a ``PUT .../computes/{name}`` body into a :class:`ComputeSpec`.

    Parameters
    ----------
    name
        Compute name from the URL.
    body
        Parsed JSON: a ``ComputeResource`` with ``properties.computeType``
        ``AmlCompute`` and its ``properties`` (``vmSize``, ``vmPriority``,
        ``scaleSettings``, ``userAccountCredentials``, ``remoteLoginPortPublicAccess``).
    engine
        For the VM size catalogue and the quota.

    Returns
    -------
    ComputeSpec
        The compute.

    Raises
    ------
    ApiError
        400 for a malformed body, another compute type, an unknown VM size, a bad
        priority or scale setting, or ``minNodeCount`` nodes that exceed a vCPU
        quota (``ClusterMinNodesExceedCoreQuota``).
    """
    check_compute_name(name)
    outer = body.get("properties") if isinstance(body, dict) else None
    if not isinstance(outer, dict):
        raise ApiError(400, "BadRequest", "request body must be a JSON object with 'properties'")
    kind = outer.get("computeType")
    if kind != "AmlCompute":
        raise ApiError(
            400,
            "BadRequest",
            f"computeType {kind!r}: the emulator creates AmlCompute clusters only "
            "(configure other computes with ComputeSpec)",
        )
    inner = outer.get("properties") or {}
    if not isinstance(inner, dict):
        raise ApiError(400, "BadRequest", "properties.properties must be an object")
    vm_size = inner.get("vmSize") or "Standard_DS3_v2"  # AML's default size
    size = engine.capacity.size(vm_size)
    if size is None or "amlcompute" not in {t.lower() for t in size.supported_compute_types}:
        message = engine.capacity.unknown_size_error(str(vm_size), f"Compute '{name}'")
        raise ApiError(400, "BadRequest", message)
    priority = inner.get("vmPriority") or "Dedicated"
    if priority not in ("Dedicated", "LowPriority"):
        raise ApiError(
            400, "BadRequest", f"vmPriority must be Dedicated or LowPriority, not {priority!r}"
        )
    if priority == "LowPriority" and not size.low_priority_capable:
        raise ApiError(400, "BadRequest", f"VM size {size.name} has no low-priority VMs")
    scale = inner.get("scaleSettings") or {}
    if not isinstance(scale, dict):
        raise ApiError(400, "BadRequest", "scaleSettings must be an object")
    max_nodes, min_nodes = scale.get("maxNodeCount", 4), scale.get("minNodeCount", 0)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (max_nodes, min_nodes)):
        raise ApiError(400, "BadRequest", "maxNodeCount and minNodeCount must be integers")
    try:
        idle = parse_duration(scale.get("nodeIdleTimeBeforeScaleDown") or "PT120S")
    except ApiError:
        raise ApiError(
            400, "BadRequest", "nodeIdleTimeBeforeScaleDown must be an ISO 8601 duration"
        ) from None
    creds = inner.get("userAccountCredentials") or {}
    if not isinstance(creds, dict):
        raise ApiError(400, "BadRequest", "userAccountCredentials must be an object")
    key = creds.get("adminUserSshPublicKey")
    try:
        spec = ComputeSpec(
            name=name,
            max_nodes=max_nodes,
            min_nodes=min_nodes,
            vm_size=str(vm_size),
            idle_seconds_before_scaledown=int(idle or 0),
            admin_user=creds.get("adminUserName") or None,
            ssh_public_keys=[key] if isinstance(key, str) and key.strip() else [],
            # "NotSpecified": open on all nodes unless a VNet is defined (REST reference)
            ssh_public_access=inner.get("remoteLoginPortPublicAccess") != "Disabled",
            vm_priority=priority,
        )
    except ValueError as exc:
        raise ApiError(400, "BadRequest", str(exc)) from None
    error = engine.capacity.min_nodes_error(size, tier_of(priority), min_nodes)
    if error is not None:
        raise ApiError(400, "ClusterMinNodesExceedCoreQuota", error)
    return spec


@dataclass
class ComputeOperation:
    """A compute create or delete operation (what ``computeOperationsStatus`` reports)."""

    id: str
    action: str
    compute: ComputeState
    started: float = field(default_factory=time.time)
    ended: float | None = None


class ComputeOperations:
    """The compute operations of one emulator, by id.

    Parameters
    ----------
    engine
        The workspace; an operation is done when the engine has applied it.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.operations: dict[str, ComputeOperation] = {}

    def start(self, action: str, compute: ComputeState) -> ComputeOperation:
        """Record an operation the engine has started.

        Parameters
        ----------
        action
            ``"create"`` or ``"delete"``.
        compute
            The compute it acts on.

        Returns
        -------
        ComputeOperation
            The operation (its id goes into the ``Azure-AsyncOperation`` URL).
        """
        op = ComputeOperation(id=str(uuid.uuid4()), action=action, compute=compute)
        self.operations[op.id] = op
        return op

    def status(self, op: ComputeOperation) -> str:
        """Return ``InProgress``, ``Succeeded`` or ``Canceled`` (created, then deleted early).

        Parameters
        ----------
        op
            The operation.

        Returns
        -------
        str
            ARM's async operation status.
        """
        compute = op.compute
        registered = self.engine.computes.get(compute.spec.name.lower()) is compute
        if op.action == "delete":
            done = "Succeeded" if not registered else None
        elif compute.provisioning_state == "Succeeded":
            done = "Succeeded"
        else:
            done = (
                "Canceled" if compute.provisioning_state == "Deleting" or not registered else None
            )
        if done is None:
            return "InProgress"
        if op.ended is None:
            op.ended = time.time()
        return done


class _ComputeHandler(BaseHandler):
    """Computes' handlers share the engine and the operations."""

    def initialize(self, ctx: ServerContext, operations: ComputeOperations | None = None) -> None:
        """Receive the server context and the compute operations.

        Parameters
        ----------
        ctx
            Shared context.
        operations
            The emulator's compute operations.
        """
        super().initialize(ctx)
        assert operations is not None  # compute_routes passes them
        self.operations = operations

    def accept(self, op: ComputeOperation, sub: str, status: int, location: bool) -> None:
        """Set the long-running operation headers (``Retry-After`` in whole seconds).

        Parameters
        ----------
        op
            The operation.
        sub
            Subscription from the path.
        status
            HTTP status.
        location
            Also send ``Location`` (delete).
        """
        version = self.get_argument("api-version", API_VERSION)
        url = identity.operation_url(sub, "computeOperationsStatus", op.id, version)
        self.set_header("Azure-AsyncOperation", url)
        if location:
            self.set_header(
                "Location", identity.operation_url(sub, "computeOperationsResults", op.id, version)
            )
        # The SDK reads a 201's Retry-After as an int; its default poll interval is 30 s.
        self.set_header("Retry-After", "1")
        self.set_status(status)


class ComputesHandler(_ComputeHandler):
    """``GET /computes``."""

    def get(self, **_: str) -> None:
        """List computes (serverless jobs' nodes are not computes of the workspace)."""
        computes = [c for c in self.engine.computes.values() if not c.serverless]
        self.send_json({"value": [shapes.compute_to_rest(c) for c in computes], "nextLink": None})


class ComputeHandler(_ComputeHandler):
    """``GET/PUT/DELETE /computes/{name}``."""

    def get(self, name: str, **_: str) -> None:
        """Return a compute (``provisioningState`` Creating, Succeeded or Deleting).

        Parameters
        ----------
        name
            Compute name.
        """
        self.send_json(shapes.compute_to_rest(self.engine.compute(name)))

    def put(self, name: str, sub: str, **_: str) -> None:
        """Create a compute (201, long-running) or update an existing one (200).

        Parameters
        ----------
        name
            Compute name.
        sub
            Subscription from the path.
        """
        spec = compute_spec_from_rest(name, self.json_body(), self.engine)
        existing = self.engine.computes.get(name.lower())
        if existing is not None and not existing.serverless:
            self.send_json(shapes.compute_to_rest(self._update(existing, spec)), 200)
            return
        named = [c for c in self.engine.computes.values() if not c.serverless]
        if len(named) >= self.engine.capacity.max_computes:
            raise ApiError(
                400,
                "QuotaExceeded",
                f"Operation results in exceeding quota limits of total computes "
                f"({self.engine.capacity.max_computes} per region).",
            )
        compute = self.engine.create_compute(spec)
        self.accept(self.operations.start("create", compute), sub, 201, location=False)
        self.finish(shapes.compute_to_rest(compute))

    def _update(self, compute: ComputeState, spec: ComputeSpec) -> ComputeState:
        """Apply new scale settings; VM size, priority and SSH cannot change (409/400)."""
        if compute.provisioning_state != "Succeeded":
            raise ApiError(
                409,
                "Conflict",
                f"Compute '{compute.spec.name}' is {compute.provisioning_state}; retry when done.",
            )
        old = compute.spec
        if old.kind != "AmlCompute":
            raise ApiError(400, "BadRequest", f"Compute '{old.name}' is a {old.kind}.")
        if (old.vm_size.lower(), old.vm_priority) != (spec.vm_size.lower(), spec.vm_priority):
            raise ApiError(
                400,
                "BadRequest",
                f"Compute '{old.name}': the VM size and priority cannot be changed after "
                "creation; delete and create the compute again.",
            )
        self.engine.update_compute(compute, spec)
        return compute

    def delete(self, name: str, sub: str, **_: str) -> None:
        """Delete (or detach) a compute: 202, long-running; its unfinished jobs fail.

        Parameters
        ----------
        name
            Compute name.
        sub
            Subscription from the path.
        """
        action = self.get_argument("underlyingResourceAction", None)
        if action is None or action.lower() not in ("delete", "detach"):
            raise ApiError(
                400, "BadRequest", "underlyingResourceAction must be 'Delete' or 'Detach'"
            )
        compute = self.engine.compute(name)
        if action.lower() == "detach" and compute.spec.kind in ("AmlCompute", "ComputeInstance"):
            raise ApiError(
                400,
                "BadRequest",
                f"Compute '{compute.spec.name}' is a managed {compute.spec.kind}: delete it, "
                "only attached computes can be detached.",
            )
        if compute.provisioning_state != "Deleting":
            self.engine.delete_compute(name)
        self.accept(self.operations.start("delete", compute), sub, 202, location=True)
        self.finish()


class ComputeOperationHandler(_ComputeHandler):
    """``GET .../locations/{loc}/computeOperationsStatus/{id}`` (and ``...Results``)."""

    def get(self, kind: str, op: str, **_: str) -> None:
        """Report an operation: ARM async operation status, or its result when done.

        Parameters
        ----------
        kind
            ``computeOperationsStatus`` or ``computeOperationsResults``.
        op
            Operation id.
        """
        found = self.operations.operations.get(op)
        if found is None:
            raise ApiError(404, "NotFound", f"operation {op} not found")
        status = self.operations.status(found)
        if status == "InProgress":
            self.set_header("Retry-After", "1")
        if kind.lower() == "computeoperationsresults":
            self.set_status(202 if status == "InProgress" else 200)
            self.finish()
            return
        body: dict[str, Any] = {
            "id": f"{self.request.path}",
            "name": found.id,
            "status": status,
            "startTime": identity.utcnow_iso(found.started),
            "endTime": identity.utcnow_iso(found.ended) if found.ended else None,
        }
        if status == "Canceled":
            body["error"] = {
                "code": "Canceled",
                "message": f"Compute '{found.compute.spec.name}' was deleted while being created.",
            }
        self.send_json(body)


class VmSizesHandler(_ComputeHandler):
    """``GET .../locations/{loc}/vmSizes`` (``ml_client.compute.list_sizes``)."""

    def get(self, loc: str, **_: str) -> None:
        """List the region's VM sizes (none for another region).

        Parameters
        ----------
        loc
            Location from the path.
        """
        sizes = self.engine.capacity.sizes if loc.lower() == identity.REGION else []
        self.send_json({"value": [shapes.vm_size_to_rest(s) for s in sizes]})


class UsagesHandler(_ComputeHandler):
    """``GET .../locations/{loc}/usages`` (``ml_client.compute.list_usage``)."""

    def get(self, loc: str, **_: str) -> None:
        """List vCPU usages and limits of the region (none for another region).

        Parameters
        ----------
        loc
            Location from the path.
        """
        items = (
            shapes.usages_to_rest(self.engine.capacity, self.engine.computes.values())
            if loc.lower() == identity.REGION
            else []
        )
        self.send_json({"value": items, "nextLink": None})


def compute_routes(
    ctx: ServerContext, ws_pattern: str, loc_pattern: str
) -> list[tuple[str, type, dict[str, Any]]]:
    """Return the tornado routes of computes, VM sizes, usages and compute operations.

    Parameters
    ----------
    ctx
        Shared handler context.
    ws_pattern
        Regex of the workspace path prefix.
    loc_pattern
        Regex of ``/subscriptions/{sub}/providers/Microsoft.MachineLearningServices/
        locations/{loc}`` (group ``loc``).

    Returns
    -------
    list
        ``(pattern, handler, kwargs)`` tuples.
    """
    kw = {"ctx": ctx, "operations": ComputeOperations(ctx.engine)}
    computes = "(?i)" + ws_pattern + r"/computes"
    loc = "(?i)" + loc_pattern
    return [
        (computes, ComputesHandler, kw),
        (computes + r"/(?P<name>[^/]+)", ComputeHandler, kw),
        (
            loc + r"/(?P<kind>computeOperationsStatus|computeOperationsResults)/(?P<op>[^/]+)",
            ComputeOperationHandler,
            kw,
        ),
        (loc + r"/vmSizes", VmSizesHandler, kw),
        (loc + r"/usages", UsagesHandler, kw),
    ]
