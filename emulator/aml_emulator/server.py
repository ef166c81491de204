"""HTTP routes of the emulator: ARM workspace API, discovery, run history, logs.

Paths and JSON shapes are those the azure-ai-ml SDK uses; see
:mod:`aml_emulator.shapes`.  Every unknown route answers 404
with ARM error JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any
from urllib.parse import urlencode

import tornado.web

from . import identity, shapes
from .code_api import code_routes
from .compute_api import compute_routes
from .datastore_api import datastore_routes
from .engine import KILL_GRACE, log_name
from .envbuild import BUILD_LOG_NAME
from .errors import ApiError
from .handlers import (
    BaseHandler,
    BuildLogHandler,
    NotFoundHandler,
    ServerContext,
)
from .jobservice import jobservice_routes
from .jobspec import parse_job
from .mlflow_api import mlflow_routes
from .nodes import read_log
from .state import TERMINAL_STATUSES, JobRecord

WS = (
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/(?P<ws>[^/]+)"
)
LOC = (
    r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.MachineLearningServices/"
    r"locations/(?P<loc>[^/]+)"
)
#: Seconds a cancel request / operation poll waits for the job to end before answering.
CANCEL_WAIT = KILL_GRACE + 2.0


def _value_list(items: list[Any]) -> dict[str, Any]:
    return {"value": items, "nextLink": None}


class WorkspaceHandler(BaseHandler):
    """``GET /workspaces/{ws}``."""

    def get(self, **_: str) -> None:
        """Return the workspace."""
        self.send_json(shapes.workspace_to_rest(identity.API_HOST, self.ctx.tracking_uri))


class _JobResource(BaseHandler):
    """Base of the job routes: renders the job resource."""

    def job_json(self, job: JobRecord) -> dict[str, Any]:
        """The job as ``GET /jobs/{name}`` returns it (run tags as the engine is set)."""
        return shapes.job_to_rest(job, self.ctx.tracking_uri, self.engine.run_tags_on_job)


#: Jobs per page of ``GET /jobs``: AML pages long job lists (``nextLink`` with a
#: ``$skipToken``, one request per page) and documents no page size; 100 here.
JOBS_PAGE = 100


class JobsHandler(_JobResource):
    """``GET /jobs`` (``listViewType`` ActiveOnly | ArchivedOnly | All; ``tag``; ``$skipToken``).

    As AML's REST list: ``ActiveOnly`` (the default) means not archived, so jobs
    that have ended are listed with their final status; ``tag`` keeps the jobs
    that carry that tag key ("jobs returned will have this tag key"), whatever
    its value (``tag=k=v`` asks for a key named ``k=v``). Pages hold
    :data:`JOBS_PAGE` jobs; ``nextLink`` (the same query with a ``$skipToken``)
    names the next one, as AML's ``JobBaseResourceArmPaginatedResult``.
    """

    def get(self, **_: str) -> None:
        """List jobs, newest first, one page."""
        view = self.get_argument("listViewType", "ActiveOnly")
        tag = self.get_argument("tag", None)
        skip = int(self.get_argument("$skipToken", "0") or 0)
        jobs = sorted(self.engine.jobs.values(), key=lambda j: j.created, reverse=True)
        if view == "ArchivedOnly":
            jobs = [j for j in jobs if j.properties.get("isArchived")]
        elif view != "All":
            jobs = [j for j in jobs if not j.properties.get("isArchived")]
        if tag is not None:  # the tags as the list shows them
            run_tags = self.engine.run_tags_on_job
            jobs = [
                j for j in jobs if tag in (j.tags if run_tags else j.properties.get("tags") or {})
            ]
        listed = jobs[skip : skip + JOBS_PAGE]
        items = [self.job_json(j) for j in listed]
        if self.engine.job_list_lag:  # statuses as they were that long ago
            then = time.monotonic() - self.engine.job_list_lag
            for item, job in zip(items, listed, strict=True):
                item["properties"]["status"] = job.status_at(then)
        page: dict[str, Any] = {"value": items, "nextLink": None}
        if skip + JOBS_PAGE < len(jobs):
            query = {k: v[-1].decode() for k, v in self.request.query_arguments.items()}
            query["$skipToken"] = str(skip + JOBS_PAGE)
            # on ARM's host, as identity.operation_url (the SDK's transport sends it back here)
            url = f"https://management.azure.com{self.request.path}?{urlencode(query)}"
            page["nextLink"] = url
        self.send_json(page)


class JobHandler(_JobResource):
    """``GET/PUT /jobs/{name}``."""

    def get(self, name: str, **_: str) -> None:
        """Return a job.

        Parameters
        ----------
        name
            Job name.
        """
        self.send_json(self.job_json(self.engine.job(name)))

    def put(self, name: str, **_: str) -> None:
        """Create (201) or update (200) a command job.

        Parameters
        ----------
        name
            Job name.
        """
        body = self.json_body()
        if name not in self.engine.jobs:
            # AML refuses a job whose code snapshot (codeId) does not exist, before the
            # job exists (as an unknown environment, Engine.job_environment).
            spec = parse_job(name, body)
            if spec.code_id:
                self.engine.codes.resolve(spec.code_id)
        job, created = self.engine.submit(name, body)
        if created:  # who may connect to the job's services (jobservice.py)
            job.owner = identity.token_subject(self.request.headers.get("Authorization"))
        self.send_json(self.job_json(job), 201 if created else 200)


def _operation_urls(sub: str, op: str, api_version: str) -> tuple[str, str]:
    return (
        identity.operation_url(sub, "mfeOperationsStatus", op, api_version),
        identity.operation_url(sub, "mfeOperationResults", op, api_version),
    )


async def _wait_done(job: Any, seconds: float) -> bool:
    if job.is_terminal:
        return True
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(job.done.wait()), seconds)
    return job.is_terminal


class JobCancelHandler(BaseHandler):
    """``POST /jobs/{name}/cancel``: 202 with Azure-AsyncOperation and Location."""

    async def post(self, name: str, sub: str, **_: str) -> None:
        """Cancel the job; the SDK's poller then follows the operation URLs.

        Parameters
        ----------
        name
            Job name.
        sub
            Subscription from the path.
        """
        self.engine.cancel(name)  # accepted, answered at once: AML's 202 (an ARM async operation)
        status_url, result_url = _operation_urls(
            sub, f"jc-{name}", self.get_argument("api-version", "2023-04-01-preview")
        )
        self.set_header("Azure-AsyncOperation", status_url)
        self.set_header("Location", result_url)
        self.set_header("Retry-After", "1")
        self.set_status(202)
        self.finish()


class OperationHandler(BaseHandler):
    """Async operation status / result of a job cancellation."""

    async def get(self, kind: str, op: str, **_: str) -> None:
        """Report the cancellation's progress.

        Parameters
        ----------
        kind
            ``mfeOperationsStatus`` or ``mfeOperationResults``.
        op
            Operation id (``jc-{job name}``).
        """
        if not op.startswith("jc-"):
            raise ApiError(404, "NotFound", f"operation {op} not found")
        job = self.engine.job(op[3:])
        done = await _wait_done(job, CANCEL_WAIT)
        if kind.lower() == "mfeoperationsstatus":
            self.send_json({"id": op, "name": op, "status": "Succeeded" if done else "InProgress"})
        elif done:
            self.set_status(200)
            self.finish()
        else:
            self.set_header("Retry-After", "1")
            self.set_status(202)
            self.finish()


class ListNodesHandler(BaseHandler):
    """``POST /computes/{name}/listNodes``."""

    def post(self, name: str, **_: str) -> None:
        """List the compute's allocated nodes (running, preparing and idle).

        Parameters
        ----------
        name
            Compute name.
        """
        compute = self.engine.compute(name)
        nodes: list[dict[str, Any]] = []
        for slot, job_name in enumerate(compute.slots):
            if job_name is None:
                continue
            job = self.engine.jobs[job_name]
            node = next((n for n in job.nodes if n.slot == slot), None)
            entry: dict[str, Any] = {
                "nodeId": compute.node_id_for_slot(slot),
                "privateIpAddress": compute.ip_for_slot(slot),
                "nodeState": node.state if node else "preparing",
                "runId": job_name,
            }
            if node is not None and node.ssh_port:
                entry["publicIpAddress"] = "127.0.0.1"
                entry["port"] = node.ssh_port
            nodes.append(entry)
        for slot in compute.idle_slots():
            nodes.append(
                {
                    "nodeId": compute.node_id_for_slot(slot),
                    "privateIpAddress": compute.ip_for_slot(slot),
                    "nodeState": "idle",
                }
            )
        self.send_json({"nodes": nodes, "nextLink": None})


class EnvironmentVersionsHandler(BaseHandler):
    """``GET /environments/{name}/versions`` (``$orderBy``, ``$top``)."""

    def get(self, name: str, **_: str) -> None:
        """List versions, newest first when ordered by creation time.

        Parameters
        ----------
        name
            Environment name.
        """
        versions = list(self.engine.environments.get(name, {}).values())
        order = self.get_argument("$orderBy", "")
        versions.sort(key=lambda e: e.created, reverse="desc" in order.lower() or not order)
        top = self.get_argument("$top", None)
        if top is not None:
            try:
                versions = versions[: max(0, int(top))]
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid $top: {top!r}") from None
        self.send_json(_value_list([shapes.environment_to_rest(e) for e in versions]))


class EnvironmentVersionHandler(BaseHandler):
    """``GET/PUT /environments/{name}/versions/{version}``."""

    def get(self, name: str, version: str, **_: str) -> None:
        """Return an environment version.

        Parameters
        ----------
        name, version
            Environment name and version.
        """
        self.send_json(shapes.environment_to_rest(self.engine.environment(name, version)))

    def put(self, name: str, version: str, **_: str) -> None:
        """Register an environment version (also the SDK's anonymous environments).

        Parameters
        ----------
        name, version
            Environment name and version.
        """
        body = self.json_body()
        if not isinstance(body, dict) or not isinstance(body.get("properties", {}), dict):
            raise ApiError(400, "BadRequest", "body must be an object with 'properties'")
        env, created = self.engine.put_environment(name, version, body.get("properties") or {})
        self.send_json(shapes.environment_to_rest(env), 201 if created else 200)


class EnvironmentContainerHandler(BaseHandler):
    """``GET /environments/{name}``."""

    def get(self, name: str, **_: str) -> None:
        """Return an environment container (name plus latest version).

        Parameters
        ----------
        name
            Environment name.
        """
        versions = self.engine.environments.get(name)
        if not versions:
            raise ApiError(404, "UserError", f"Environment {name} not found in workspace")
        self.send_json(shapes.environment_container_to_rest(name, list(versions.values())))


class EnvironmentsHandler(BaseHandler):
    """``GET /environments`` (``listViewType``): what ``ml_client.environments.list()`` reads.

    One container per environment name, anonymous ``CliV2AnonymousEnvironment``
    included (clients filter it out), in one page (``nextLink`` null).
    """

    def get(self, **_: str) -> None:
        """List environment containers, by name."""
        view = self.get_argument("listViewType", "ActiveOnly")
        containers = (
            []
            if view == "ArchivedOnly"
            else [
                shapes.environment_container_to_rest(name, list(versions.values()))
                for name, versions in sorted(self.engine.environments.items())
                if versions
            ]
        )
        self.send_json(_value_list(containers))


class DiscoveryHandler(BaseHandler):
    """``GET /discovery``: data-plane service URLs of the workspace."""

    def get(self) -> None:
        """Return the discovery document."""
        self.send_json(shapes.discovery_document(identity.API_HOST))


def log_urls(base_url: str, job: Any) -> dict[str, str]:
    """Return the log file URLs of a job's nodes.

    Parameters
    ----------
    base_url
        Emulator base URL.
    job
        The job (a ``JobRecord``).

    Returns
    -------
    dict
        ``user_logs/std_log_process_{rank}.txt`` (and, once the job's environment
        build began, ``azureml-logs/20_image_build_log.txt``) to URL.
    """
    logs = f"{base_url}/emulator/logs/{job.name}"
    built = {BUILD_LOG_NAME: f"{logs}/{BUILD_LOG_NAME}"} if job.build_log_path else {}
    return {**built, **{log_name(n.rank): f"{logs}/{log_name(n.rank)}" for n in job.nodes}}


class RunDetailsHandler(BaseHandler):
    """Run history ``GET .../runs/{id}/details``."""

    def get(self, run_id: str, **_: str) -> None:
        """Return run details with status, error and log URLs.

        Parameters
        ----------
        run_id
            Job name.
        """
        job = self.engine.job(run_id)
        self.send_json(shapes.run_details(job, log_urls(self.ctx.base_url, job)))


class RunHandler(BaseHandler):
    """Run history ``GET .../runs/{id}``."""

    def get(self, run_id: str, **_: str) -> None:
        """Return the run.

        Parameters
        ----------
        run_id
            Job name.
        """
        self.send_json(shapes.run_record(self.engine.job(run_id)))


class ServiceInstancesHandler(BaseHandler):
    """Run history ``GET .../runs/{id}/serviceinstances/{nodeIndex}`` (``jobs.show_services``)."""

    def get(self, run_id: str, node_index: str, **_: str) -> None:
        """Return the node's job service instances (see :mod:`.jobservice`).

        Parameters
        ----------
        run_id
            Job name.
        node_index
            Node rank.
        """
        job = self.engine.job(run_id)
        ws_base = "ws" + self.ctx.base_url.removeprefix("http")  # ws:// or wss://
        self.send_json(self.engine.job_services.instances(job, int(node_index), ws_base))


class RunPatchHandler(BaseHandler):
    """Run history ``PATCH .../experiments/{exp}/runs/{id}`` (tags, display name)."""

    def patch(self, experiment: str, run_id: str, **_: str) -> None:
        """Update the run's tags, properties, display name and description.

        Parameters
        ----------
        experiment
            Experiment name.
        run_id
            Job name.
        """
        job = self.engine.job(run_id)
        body = self.json_body()
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "body must be a JSON object")
        for key in ("tags", "properties"):
            if isinstance(body.get(key), dict):
                merged = dict(job.properties.get(key) or {})
                merged.update({k: v for k, v in body[key].items() if v is not None})
                job.properties[key] = merged
        for key in ("displayName", "description"):
            if body.get(key) is not None:
                job.properties[key] = body[key]
        self.send_json(shapes.run_record(job))


class LogHandler(BaseHandler):
    """``GET /emulator/logs/{job}/user_logs/std_log_process_{rank}.txt``."""

    control_plane = False

    def get(self, name: str, rank: str) -> None:
        """Return a node's log as text.

        Parameters
        ----------
        name
            Job name.
        rank
            Node rank.
        """
        job = self.engine.job(name)
        r = int(rank)
        if r >= len(job.nodes):
            raise ApiError(404, "NotFound", f"job {name} has no node of rank {r}")
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(read_log(job.nodes[r]))


class StatusHandler(BaseHandler):
    """``GET /emulator/status``: a human-friendly summary (not an AML API)."""

    control_plane = False

    def get(self) -> None:
        """Return computes, jobs and request counts (see :class:`EmulatorApplication`)."""
        self.send_json(
            {
                "subscription_id": identity.SUBSCRIPTION_ID,
                "resource_group": identity.RESOURCE_GROUP,
                "workspace_name": identity.WORKSPACE_NAME,
                "computes": {
                    c.spec.name: {
                        "kind": c.spec.kind,
                        "vm_size": c.spec.vm_size,
                        "vm_priority": c.spec.vm_priority,
                        "provisioning_state": c.provisioning_state,
                        "serverless": c.serverless,
                        "max_nodes": c.spec.max_nodes,
                        "in_use": c.in_use,
                        "queued": list(c.queue),
                    }
                    for c in self.engine.computes.values()
                },
                "jobs": {
                    j.name: {
                        "status": j.status,
                        # (time.time(), status) of each change
                        "status_log": [
                            (time.time() - time.monotonic() + t, v) for t, v in j.status_log
                        ],
                        "compute": j.compute,
                        "nodes": [n.as_dict() for n in j.nodes],
                    }
                    for j in self.engine.jobs.values()
                },
                "terminal_statuses": list(TERMINAL_STATUSES),
                "requests": dict(getattr(self.application, "requests", {})),
            }
        )


class RequestLogHandler(BaseHandler):
    """``GET /emulator/requests``: the request log (see :class:`ServerContext`); not an AML API."""

    control_plane = False

    def get(self) -> None:
        """Return the logged requests, oldest first; ``?clear=1`` empties the log."""
        self.send_json(list(self.ctx.request_log))
        if self.get_argument("clear", ""):
            self.ctx.request_log.clear()


class EmulatorApplication(tornado.web.Application):
    """The emulator's tornado application; it counts the requests it answered.

    ``requests`` maps ``"{METHOD} {handler class}"`` (e.g. ``"PUT JobHandler"`` for
    ``PUT /jobs/{name}``, refused ones included) to a count since start. Tests read
    it from ``GET /emulator/status`` to prove that nothing was submitted.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: Counter[str] = Counter()

    def log_request(self, handler: tornado.web.RequestHandler) -> None:
        """Count the request, then log it as tornado does.

        Parameters
        ----------
        handler
            The handler that answered.
        """
        self.requests[f"{handler.request.method} {type(handler).__name__}"] += 1
        super().log_request(handler)


def make_app(ctx: ServerContext) -> tornado.web.Application:
    """Build the tornado application.

    Parameters
    ----------
    ctx
        Shared handler context.

    Returns
    -------
    EmulatorApplication
        The application (unknown routes answer ARM 404 JSON).
    """
    kw = {"ctx": ctx}
    hist = "/history/v1\\.0" + WS
    routes: list[Any] = [
        (WS + r"/jobs", JobsHandler, kw),
        (WS + r"/jobs/(?P<name>[^/]+)/cancel", JobCancelHandler, kw),
        (WS + r"/jobs/(?P<name>[^/]+)", JobHandler, kw),
        (WS + r"/computes/(?P<name>[^/]+)/listNodes", ListNodesHandler, kw),
        (WS + r"/environments", EnvironmentsHandler, kw),
        (WS + r"/environments/(?P<name>[^/]+)/versions", EnvironmentVersionsHandler, kw),
        (
            WS + r"/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)",
            EnvironmentVersionHandler,
            kw,
        ),
        (WS + r"/environments/(?P<name>[^/]+)", EnvironmentContainerHandler, kw),
        (WS, WorkspaceHandler, kw),
        (
            LOC + r"/(?P<kind>mfeOperationsStatus|mfeOperationResults)/(?P<op>[^/]+)",
            OperationHandler,
            kw,
        ),
        (hist + r"/runs/(?P<run_id>[^/]+)/details", RunDetailsHandler, kw),
        (
            hist + r"/runs/(?P<run_id>[^/]+)/serviceinstances/(?P<node_index>\d+)",
            ServiceInstancesHandler,
            kw,
        ),
        (hist + r"/runs/(?P<run_id>[^/]+)", RunHandler, kw),
        (hist + r"/experiments/(?P<experiment>[^/]+)/runs/(?P<run_id>[^/]+)", RunPatchHandler, kw),
        (r"/discovery", DiscoveryHandler, kw),
        (r"/emulator/status", StatusHandler, kw),
        (r"/emulator/requests", RequestLogHandler, kw),
        (
            r"/emulator/logs/(?P<name>[^/]+)/user_logs/std_log_process_(?P<rank>\d+)\.txt",
            LogHandler,
            kw,
        ),
        (
            r"/emulator/logs/(?P<name>[^/]+)/azureml-logs/20_image_build_log\.txt",
            BuildLogHandler,
            kw,
        ),
    ]
    routes = [("(?i)" + p, h, k) for p, h, k in routes]
    routes[:0] = compute_routes(ctx, WS, LOC)
    routes[:0] = datastore_routes(ctx, WS)
    routes[:0] = code_routes(ctx, WS)
    routes.extend(mlflow_routes(ctx))
    routes.extend(jobservice_routes(ctx.engine.job_services))
    return EmulatorApplication(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=kw,
        compress_response=False,
    )
