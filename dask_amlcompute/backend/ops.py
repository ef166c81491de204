"""The one place that calls the (synchronous) azure-ai-ml SDK: in threads, retried, typed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..exceptions import (
    AccessDeniedError,
    AmlComputeError,
    ComputeNotFoundError,
    ConfigurationError,
    ControlPlaneError,
    NotAmlComputeError,
)
from .sdknotices import without_sdk_output

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Job statuses after which a job will not run again. Not NotResponding and Paused: such
#: jobs still hold their nodes, a closing cluster must cancel them (AML job status docs).
TERMINAL_STATUSES = frozenset({"Completed", "Failed", "Canceled"})
#: Finalizing: the job's user code has exited, AML is releasing its nodes: nothing to cancel.
ENDING = TERMINAL_STATUSES | {"Finalizing"}


@dataclass(frozen=True)
class ComputeInfo:
    """What the client needs to know about a compute target."""

    name: str
    type: str
    vm_size: str | None = None
    max_nodes: int = 0
    ssh_public_access: bool = False
    admin_user: str | None = None
    node_public_ip: bool = True  # enable_node_public_ip: public SSH needs it
    tier: str = "dedicated"  # or "low_priority"
    idle_seconds: int | None = None  # before AML releases (stops billing) an idle node


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of an AML job."""

    name: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    studio_url: str | None = None

    @property
    def terminal(self) -> bool:
        """True once the job has ended."""
        return self.status in TERMINAL_STATUSES


def status_text(status: Any) -> str:
    """The plain status string (azure-ai-ml 1.35 returns a str-enum)."""
    return str(getattr(status, "value", status) or "Unknown")


#: Seconds a call failing transiently is retried, after the ``MLClient``'s own azure-core
#: retries (3 by default): bursts of 429/5xx are waited out.
RETRY_WINDOW = 120.0
#: Back-off without a ``Retry-After``: 0.8 s, 1.6 s, ... at most 30 s.
RETRY_BACKOFF = (0.8, 30.0)


def retry_delay(exc: BaseException, attempt: int) -> float:
    """Seconds before retrying failed attempt ``attempt``: AML's ``Retry-After``, or a back-off."""
    from azure.core.pipeline import PipelineResponse
    from azure.core.pipeline.policies import RetryPolicy

    response = getattr(exc, "response", None)
    if getattr(response, "headers", None) is not None:
        after = RetryPolicy().get_retry_after(PipelineResponse(None, response, None))  # type: ignore[arg-type,type-var]
        if after is not None:
            return after
    return float(min(RETRY_BACKOFF[1], RETRY_BACKOFF[0] * 2 ** (attempt - 1)))


#: Job submissions and cancellations in flight at once per cluster (a bounded burst).
MAX_CONCURRENT_WRITES = 4
#: Workspaces read, by ``MLClient`` (their region and tracking URI do not change).
_WORKSPACES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


class AmlOps:
    """Async facade over an ``MLClient`` (``tracking_uri``: MLflow's; None: read when needed)."""

    def __init__(self, ml_client: Any, tracking_uri: str | None = None) -> None:
        self.ml_client = ml_client
        self._tracking_uri = tracking_uri
        self._fetched: dict[str, asyncio.Task] = {}
        self._warned: set[str] = set()
        self._writes = asyncio.Semaphore(MAX_CONCURRENT_WRITES)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` (safe to repeat) in a thread, retried for :data:`RETRY_WINDOW` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_WINDOW
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(fn, *args, **kwargs)
            except ControlPlaneError as exc:
                delay = retry_delay(exc.__cause__ or exc, attempt)
                if loop.time() + delay > deadline:
                    raise
                logger.debug("Attempt %d failed (%s); retrying in %.1f s", attempt, exc, delay)
                await asyncio.sleep(delay)

    async def _once(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in a thread once; a transient failure is a :class:`ControlPlaneError`."""
        from azure.core.exceptions import ServiceRequestError, ServiceResponseError

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            name = getattr(fn, "__qualname__", getattr(fn, "__name__", "call"))
            status = getattr(exc, "status_code", None)
            if status in (401, 403):
                raise AccessDeniedError(
                    f"Azure ML refused {name}: {str(exc).splitlines()[0]}. Sign in again "
                    "(`az login`) or ask for a role on the workspace that allows it."
                ) from exc
            lost = isinstance(exc, ServiceRequestError | ServiceResponseError | ConnectionError)
            if not lost and status not in (408, 429, 500, 502, 503, 504):  # throttled, 5xx
                raise
            raise ControlPlaneError(
                f"The Azure ML control plane kept failing for {name}: {exc}. Check the "
                "workspace's service health and your network; nothing was lost on the client side."
            ) from exc

    def _warn_once(self, route: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        if route not in self._warned:
            self._warned.add(route)
            logger.log(level, msg, *args)

    async def _found(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, None when AML has no such resource."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return await self._call(fn, *args, **kwargs)
        except ResourceNotFoundError:
            return None

    async def get_compute(self, name: str) -> ComputeInfo:
        """An AmlCompute target; :class:`ComputeNotFoundError` lists the computes that exist."""
        compute = await self._found(self.ml_client.compute.get, name)
        if compute is None:
            names = await self._names(self.ml_client.compute.list)
            raise ComputeNotFoundError(
                f"No compute named {name!r} in workspace "
                f"{getattr(self.ml_client, 'workspace_name', '?')!r}. Computes that exist: "
                f"{', '.join(names) or 'none'}. Create an AmlCompute cluster or fix the name."
            ) from None
        kind = str(getattr(compute, "type", "") or "")
        if kind.lower() != "amlcompute":
            raise NotAmlComputeError(
                f"Compute {name!r} is a {kind or 'compute of unknown type'}, not an AmlCompute "
                "cluster. dask-amlcompute needs a compute cluster (AmlCompute); create one with "
                "`az ml compute create --type amlcompute` or pick another compute."
            )
        ssh = getattr(compute, "ssh_settings", None)
        return ComputeInfo(
            name=name,
            type=kind,
            vm_size=getattr(compute, "size", None),
            max_nodes=int(getattr(compute, "max_instances", 0) or 0),
            ssh_public_access=bool(getattr(compute, "ssh_public_access_enabled", False)),
            admin_user=getattr(ssh, "admin_username", None) if ssh else None,
            node_public_ip=getattr(compute, "enable_node_public_ip", True) is not False,
            tier=str(getattr(compute, "tier", None) or "dedicated").lower().replace("-", "_"),
            idle_seconds=getattr(compute, "idle_time_before_scale_down", None),
        )

    async def create_compute(
        self, name: str, size: str, max_nodes: int, tier: str, idle_seconds: int, timeout: float
    ) -> None:
        """Create an AmlCompute cluster (min 0 nodes); wait, bounded, for the SDK's poller."""
        from azure.ai.ml.entities import AmlCompute
        from azure.core.exceptions import HttpResponseError

        compute = AmlCompute(name=name, size=size, max_instances=max_nodes, tier=tier,
                             idle_time_before_scale_down=idle_seconds)  # fmt: skip
        try:
            await self._poll(self.ml_client.compute.begin_create_or_update, compute, timeout)
        except HttpResponseError as exc:
            if exc.status_code == 400:  # AML refused the request (name, size, quota)
                raise ConfigurationError(
                    f"AML refused to create compute {name!r}: {exc.message}. Nothing was created."
                ) from None
            raise

    async def delete_compute(self, name: str, timeout: float) -> None:
        """Delete a compute (``compute.begin_delete``) and wait, bounded, for AML to finish."""
        await self._poll(self.ml_client.compute.begin_delete, name, timeout)

    async def _poll(self, begin: Callable[[Any], Any], arg: Any, timeout: float) -> None:
        await self._once((await self._call(begin, arg)).result, timeout)

    async def _shared(self, key: str, fetch: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``fetch()`` once per ``AmlOps`` (again after a failure), shared by concurrent callers."""
        task = self._fetched.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = self._fetched[key] = asyncio.ensure_future(fetch())
        return await asyncio.shield(task)  # a caller's timeout does not cancel it

    async def workspace(self) -> Any:
        """The workspace (``workspaces.get``, once per ``MLClient``): region, MLflow tracking URI."""
        if (ws := _WORKSPACES.get(self.ml_client)) is None:
            get, name = self.ml_client.workspaces.get, self.ml_client.workspace_name
            ws = _WORKSPACES[self.ml_client] = await self._shared(
                "ws", lambda: self._call(get, name)
            )
        self._tracking_uri = self._tracking_uri or ws.mlflow_tracking_uri
        return ws

    async def read_ahead(self) -> None:
        """Read the workspace now, beside other look-ups (a failure shows where it is used)."""
        with contextlib.suppress(Exception):
            await self.workspace()

    async def _regional(self, what: str) -> list[Any]:
        """``compute.list_sizes``/``list_usage`` of the workspace's region, once per ``AmlOps``."""

        async def fetch() -> list[Any]:
            where = (await self.workspace()).location  # the SDK would fetch the workspace again
            return await self._call(
                lambda: list(getattr(self.ml_client.compute, what)(location=where))
            )

        return await self._shared(what, fetch)

    async def list_sizes(self) -> list[Any]:
        """The region's VM sizes."""
        return await self._regional("list_sizes")

    async def list_usage(self) -> list[Any]:
        """The region's vCPU usage and limits."""
        return await self._regional("list_usage")

    async def _names(self, list_fn: Callable[[], Any], field: str = "name") -> list[str]:
        """``field`` of everything ``list_fn`` lists, sorted; empty on error (for messages)."""
        try:
            items = await self._call(lambda: list(list_fn()))
        except Exception as exc:
            logger.debug("Could not list %s: %s", getattr(list_fn, "__qualname__", ""), exc)
            return []
        found = {str(v) for i in items if (v := getattr(i, field, None)) is not None}
        return sorted(found, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))

    async def get_datastore(self, name: str, include_secrets: bool = False) -> Any | None:
        """The datastore ``name`` (``include_secrets``: and its secret), None when there is none."""
        from azure.core.exceptions import HttpResponseError

        try:
            get = self.ml_client.datastores.get
            return await self._found(get, name, include_secrets=include_secrets)
        except HttpResponseError as exc:  # AML's refusal
            raise AmlComputeError(str(exc)) from None

    async def list_datastore_names(self) -> list[str]:
        """Sorted names of the workspace's datastores (empty on error)."""
        return await self._names(self.ml_client.datastores.list)

    async def check_environment(self, reference: str) -> None:
        """Check a registered environment (``[azureml:]name:version|@latest``) exists.

        Raises :class:`EnvironmentNotFoundError` listing what exists; others are not looked up.
        """
        from azure.ai.ml.exceptions import ValidationErrorType, ValidationException

        from ..exceptions import EnvironmentNotFoundError
        from ..validation import environment_reference

        ref, envs = environment_reference(reference), self.ml_client.environments
        if ref is None:
            return
        try:
            if await self._found(envs.get, ref.name, ref.version, ref.label):
                return
        except ValidationException as exc:  # "@latest" of a name without versions (client-side)
            if getattr(exc, "error_type", None) != ValidationErrorType.RESOURCE_NOT_FOUND:
                raise
        found = await self._names(envs.list)  # less the SDK's inline ones of past jobs
        names = sorted(set(found) - {"CliV2AnonymousEnvironment"}, key=str.lower)
        shown = ", ".join(names[:25]) + (f" and {len(names) - 25} more" if len(names) > 25 else "")
        what, versions = f"No environment named {ref.name!r}.", []
        if ref.name in names and ref.version is not None:
            versions = await self._names(lambda: envs.list(name=ref.name), "version")
        if versions:
            what = f"Environment {ref.name!r} has no version {ref.version!r} (versions: "
            what += f"{', '.join(versions[:25])})."
        raise EnvironmentNotFoundError(
            f"environment={reference!r} does not exist in workspace "
            f"{getattr(self.ml_client, 'workspace_name', '?')!r}: {what} Environments that "
            f"exist: {shown or 'none'}. Register it (az ml environment create, or "
            "ml_client.environments.create_or_update), fix the name or version, pass a Docker "
            "image with its registry ('docker.io/library/python:3.11'), or leave environment "
            "unset for the pinned default environment. Nothing was submitted."
        )

    async def _create(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a ``create_or_update`` (SDK output muted); AML refusing it: typed."""
        try:
            async with self._writes:
                return await self._call(without_sdk_output(fn), *args)  # an upload's progress bar
        except AmlComputeError:
            raise
        except Exception as exc:
            raise AmlComputeError(f"AML refused {what}: {exc}") from exc

    async def submit(self, job: Any) -> JobInfo:
        """Create the job; returns its first snapshot (at most MAX_CONCURRENT_WRITES at once)."""
        try:
            created = await self._create(
                f"to create job {job.name!r}", self.ml_client.jobs.create_or_update, job
            )
        except ControlPlaneError as exc:
            # The PUT may have landed before the connection broke: never submit twice.
            try:
                return await self.get_job(job.name)
            except Exception:
                raise exc from None
        return self._info(created)

    async def register_code(self, folder: str) -> str:
        """Register a code snapshot folder (uploaded unless AML has its hash); its ARM id.

        As ``jobs.create_or_update`` does for ``code=<folder>`` (azure-ai-ml 1.35 has no
        public code-asset API), before the job's PUT.
        """
        from azure.ai.ml.entities._assets import Code

        def register() -> Any:
            return self.ml_client._code.create_or_update(Code(path=folder))  # hashes the folder

        return str((await self._create(f"the code snapshot {folder}", register)).id)

    async def get_job(self, name: str) -> JobInfo:
        """Current status and tags of a job."""
        return self._info(await self._call(self.ml_client.jobs.get, name))

    async def run_tags(self, name: str) -> dict[str, str]:
        """The job's run tags (``{}`` if unreadable): MLflow's, else private run history's."""
        try:
            if "mlflow" not in self._warned:  # a route that failed once is not tried again
                if self._tracking_uri is None:
                    await asyncio.wait_for(self.workspace(), 15)
                return await asyncio.wait_for(self._call(self._mlflow_run_tags, name), 15)
        except Exception as exc:  # ImportError: mlflow-skinny (+ azureml-mlflow on AML) missing
            self._warn_once(
                "mlflow",
                "Reading the run tags of %s through MLflow failed (%s: %s); falling back to run "
                "history through a private azure-ai-ml attribute (not trying MLflow again).",
                *(name, type(exc).__name__, exc or "timed out"),
                level=logging.INFO,
            )
        try:
            run = await self._call(self.ml_client.jobs._runs_operations.get_run, name)
        except Exception as exc:
            self._warn_once(
                "run-history", "Reading the run tags of %s from run history failed: %s", name, exc
            )
            return {}
        return {str(k): str(v) for k, v in (getattr(run, "tags", None) or {}).items()}

    def _mlflow_run_tags(self, name: str) -> dict[str, str]:
        """Run tags through the mlflow client and the workspace's tracking URI (blocking)."""
        from azure.identity import DefaultAzureCredential
        from mlflow.tracking import MlflowClient

        # azureml-mlflow logs in with a DefaultAzureCredential of its own
        own = isinstance(getattr(self.ml_client, "_credential", None), DefaultAzureCredential)
        if str(self._tracking_uri).startswith("azureml:") and not own:
            raise LookupError(
                "azureml-mlflow would log in on its own (interactive outside a job), not with "
                "this cluster's credential"
            )
        run = MlflowClient(tracking_uri=self._tracking_uri).get_run(name)
        return {str(k): str(v) for k, v in run.data.tags.items()}

    async def with_run_tags(self, info: JobInfo) -> JobInfo:
        """``info`` with the run-history tags of its job merged in (see :meth:`run_tags`)."""
        return replace(info, tags={**info.tags, **await self.run_tags(info.name)})

    async def cancel(
        self, name: str, timeout: float = 60, wait: bool = True, status: str | None = None
    ) -> str | None:
        """Cancel a job, wait (bounded) for AML to accept it; returns its status, None: failed.

        ``status``: as the caller has just read it (else read first). A job ending (Finalizing)
        or ended, also before AML takes the cancel, is left alone: no failure.
        """
        try:
            status = status or (await self.get_job(name)).status
            if status in ENDING:
                return status
            async with self._writes:  # the request; waiting for its result is not bounded by it
                poller = await self._call(self.ml_client.jobs.begin_cancel, name, polling=wait)
            if not wait:  # polling=False: no background thread polls the cancel's operation
                return "CancelRequested"
            await asyncio.wait_for(asyncio.to_thread(poller.result), timeout)
        except Exception as exc:
            with contextlib.suppress(Exception):
                if (now := (await asyncio.wait_for(self.get_job(name), 15)).status) in ENDING:
                    return now  # AML refuses to cancel a job that has ended
            logger.warning("Cancelling AML job %s failed: %s", name, exc)
            return None
        return "Canceled"

    async def list_nodes(self, compute: str) -> list[dict[str, Any]]:
        """Nodes of a compute as plain dicts with camelCase keys (``nodeId``, ``runId``, ...)."""
        nodes = await self._call(lambda: list(self.ml_client.compute.list_nodes(compute)))
        keys = ("nodeId", "privateIpAddress", "publicIpAddress", "port", "nodeState", "runId")
        # azure-ai-ml 1.35 puts the REST (camelCase) names in __dict__; its attributes stay None
        snake = {k: re.sub("([A-Z])", r"_\1", k).lower() for k in keys}
        return [{k: vars(n).get(k, getattr(n, snake[k], None)) for k in keys} for n in nodes]

    async def show_services(self, name: str, node_index: int = 0) -> dict[str, Any]:
        """One node's ``ServiceInstance`` by service name (SSH's: ``properties["ProxyEndpoint"]``)."""
        found = await self._call(self.ml_client.jobs.show_services, name, node_index)
        return dict(found or {})

    async def run_details(self, name: str) -> tuple[str | None, dict[str, str]]:
        """The AML error message of a job and its log files (name -> URL)."""
        try:
            details = await self._call(self.ml_client.jobs._runs_operations.get_run_details, name)
        except Exception as exc:
            self._warn_once("run-details", "Reading the run details of %s failed: %s", name, exc)
            return None, {}
        message = getattr(getattr(getattr(details, "error", None), "error", None), "message", None)
        return message, dict(getattr(details, "log_files", None) or {})

    async def read_log(self, url: str) -> str | None:
        """The text of one log file of a job (a bounded HTTP read), or None."""
        import requests

        try:
            resp = await asyncio.to_thread(requests.get, url, timeout=10)
            resp.raise_for_status()
        except Exception as exc:
            logger.debug("Could not read log %s: %s", url.split("?", 1)[0], exc)
            return None
        return resp.text

    async def log_tail(self, log_files: dict[str, str], lines: int = 30) -> str | None:
        """The last ``lines`` lines of up to four of a job's user logs."""
        keys = sorted(k for k in log_files if "user_logs/" in k or k.startswith("std_log"))[:4]
        texts = await asyncio.gather(*(self.read_log(log_files[k]) for k in keys))
        tails = [(k, t.splitlines()[-lines:]) for k, t in zip(keys, texts, strict=True) if t]
        return "\n".join(f"--- {k} ---\n" + "\n".join(t) for k, t in tails if t) or None

    @staticmethod
    def _info(job: Any) -> JobInfo:
        studio = None
        with contextlib.suppress(Exception):
            studio = job.studio_url
        return JobInfo(
            name=job.name,
            status=status_text(job.status),
            tags={str(k): str(v) for k, v in (job.tags or {}).items()},
            studio_url=studio,
        )

    async def register_environment(self, environment: Any) -> str:
        """Create (or update) an environment version; returns ``"name:version"``."""
        create = self.ml_client.environments.create_or_update
        created = await self._create("the environment", create, environment)
        _, name, _, version = created.id.rsplit("/", 3)  # an anonymous one's .version: rehashed
        return f"{name}:{version}"

    async def list_jobs(self, *, include_ended: bool = False, tag: str | None = None) -> list[Any]:
        """The workspace's jobs: not archived (``include_ended``: those too); ``tag``: with this key."""
        from azure.ai.ml.constants import ListViewType

        view = ListViewType.ALL if include_ended else ListViewType.ACTIVE_ONLY
        extra = {} if tag is None else {"tag": tag}
        jobs = await self._call(
            lambda: list(self.ml_client.jobs.list(list_view_type=view, **extra))
        )
        return [j for j in jobs if j is not None]  # the SDK yields None for unparsable jobs

    async def list_job_infos(self, tag: str) -> dict[str, JobInfo]:
        """Snapshots of the (not archived) jobs that carry tag key ``tag``, by name."""
        return {j.name: self._info(j) for j in await self.list_jobs(tag=tag)}

    async def get_job_entity(self, name: str) -> Any | None:
        """The SDK's entity of a job (command, resources, distribution, tags), None if none exists."""
        return await self._found(self.ml_client.jobs.get, name)


# -- running the async operations from synchronous code --------------------------


def run_blocking(coro: Coroutine[Any, Any, T], cleanup_timeout: float = 120) -> T:
    """Run ``coro`` from synchronous code (under a running loop: on a thread of its own).

    Ctrl-C cancels it, waits (bounded) for its cleanup, then raises ``KeyboardInterrupt``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> T:
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        started.set()
        return await coro

    def target() -> None:
        try:
            box["result"] = asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="dask-amlcompute-submit", daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        if started.wait(10):
            box["loop"].call_soon_threadsafe(box["task"].cancel)
        thread.join(cleanup_timeout)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]
