"""The contract between the client and the nodes of a job.

Both sides import it (the node side nothing else of the client's): the job and
run tags, the in-job command line (:class:`NodeOptions` builds and parses it with
one argparse definition, :func:`node_parser`), the environment variables and log
markers of TLS and job mode, and the job names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from distributed.comm import get_address_host_port
from distributed.utils import wait_for

#: Job tags that identify a cluster's jobs.
TAG_CLUSTER = "dask_cluster"
TAG_ROLE = "dask_role"
TAG_VERSION = "dask_amlcompute"
TAG_USER = "dask_user"
#: ``"script"`` on the jobs of ``dask-amlcompute run`` (job mode); absent on clusters.
TAG_MODE = "dask_mode"
#: Job tag of a cluster's main job: JSON of the settings ``from_name`` needs
#: (see :func:`cluster_settings`), so nothing reads a command line back.
SETTINGS_TAG = "dask_settings"

#: Run tags the scheduler node publishes (mlflow) and the client reads from the job.
SCHEDULER_TAG = "dask_scheduler"
DASHBOARD_TAG = "dask_dashboard"
#: The id of the scheduler behind ``SCHEDULER_TAG`` (a new one for every attempt of the job:
#: a job AML runs again after a preemption publishes a new id before its new address).
SCHEDULER_ID_TAG = "dask_scheduler_id"

#: Environment variables carrying the cluster's TLS certificate and key (PEM) to the nodes.
TLS_CERT_ENV = "DASK_AMLCOMPUTE_TLS_CERT"
TLS_KEY_ENV = "DASK_AMLCOMPUTE_TLS_KEY"

#: Job mode: the run tag rank 0 sets to the script's exit code before the job ends.
EXIT_CODE_TAG = "dask_script_exit_code"
#: Job mode: the lines rank 0 prints around the script's output in its log.
OUTPUT_BEGIN = "----- dask-amlcompute: script output -----"
OUTPUT_END = "----- dask-amlcompute: script exited with code"

#: The module every node of a cluster or worker job runs (``python -m``).
NODE_MODULE = "dask_amlcompute.node"
#: The module every node of a job-mode job runs (``python -m``).
SCRIPT_MODULE = "dask_amlcompute.node.script"


@dataclass(frozen=True)
class ScriptOptions:
    """Job mode's options of ``python -m dask_amlcompute.node.script``."""

    #: Path of the script in the code snapshot.
    script: str | None = None
    #: Seconds rank 0 waits for every worker before starting the script anyway.
    wait_workers: float = 300.0
    #: The script's own arguments (after ``--``).
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeOptions:
    """Command-line options of the in-job entrypoints.

    ``python -m dask_amlcompute.node`` (cluster and worker jobs) takes every
    option but ``script``; ``python -m dask_amlcompute.node.script`` (job mode,
    ``script`` set) takes them all. :meth:`to_argv` and :meth:`from_argv`
    round-trip: ``NodeOptions.from_argv(o.to_argv(), script=o.script is not None) == o``.
    """

    role: str
    name_prefix: str
    processes: int = 1
    threads: int | None = None
    memory_limit: str | int | float | None = "auto"
    scheduler_port: int = 8786
    dashboard_port: int = 8787
    worker_on_scheduler: bool = True
    death_timeout: float = 300.0
    idle_timeout: float | None = None
    no_client_timeout: float | None = None
    first_contact_timeout: float | None = None
    #: The main job's ``job_timeout`` (rank 0 names it when AML stops the job for it).
    job_timeout: float | None = None
    scheduler_address: str | None = None
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    worker_options: Mapping[str, Any] = field(default_factory=dict)
    #: dask-cuda workers: ``processes`` is the node's GPU count, one worker per GPU
    #: (``dask_cuda.CUDAWorker``, ``resources={"GPU": 1}``).
    cuda: bool = False
    #: Job mode only: the script to run on rank 0.
    script: ScriptOptions | None = None

    @property
    def module(self) -> str:
        """The module the job's nodes run: :data:`SCRIPT_MODULE` in job mode, else :data:`NODE_MODULE`."""
        return SCRIPT_MODULE if self.script is not None else NODE_MODULE

    def worker_suffixes(self, n_nodes: int) -> list[str]:
        """Name suffixes of the workers this job starts (``-RANK-INDEX``)."""
        first = 0 if (self.role == "workers" or self.worker_on_scheduler) else 1
        return [f"-{r}-{i}" for r in range(first, n_nodes) for i in range(self.processes)]

    def to_argv(self) -> list[str]:
        """The entrypoint's arguments (what follows ``python -m MODULE``): the options set."""
        argv: list[str] = []
        for opts in (self, self.script) if self.script else (self,):
            for f in fields(opts):
                value = getattr(opts, f.name)
                if f.name == "args" or isinstance(value, ScriptOptions | type(None)):
                    continue
                if value == f.default or value == {}:
                    continue
                flag = "--" + f.name.replace("_", "-")
                if isinstance(value, bool):  # only flags that differ from the default
                    argv.append(flag if value else f"--no-{flag[2:]}")
                elif isinstance(value, Mapping):
                    argv += [flag, json.dumps(dict(value), sort_keys=True)]
                else:
                    argv += [flag, _number(value) if isinstance(value, int | float) else value]
        return argv + (["--", *self.script.args] if self.script else [])

    @classmethod
    def from_argv(
        cls, argv: Sequence[str], *, script: bool = False, description: str | None = None
    ) -> NodeOptions:
        """Parse an entrypoint's arguments (what :meth:`to_argv` returned).

        ``script``: job mode (``python -m dask_amlcompute.node.script``), which takes ``--script``,
        ``--wait-workers`` and, after ``--``, the script's arguments. Bad arguments or ``--help``
        raise ``SystemExit``.
        """
        argv = list(argv)
        script_args: list[str] = []
        if script and "--" in argv:
            cut = argv.index("--")
            argv, script_args = argv[:cut], argv[cut + 1 :]
        args = vars(node_parser(script=script, description=description).parse_args(argv))
        job = {f.name: args.pop(f.name) for f in fields(ScriptOptions) if f.name in args}
        return cls(**args, script=ScriptOptions(**job, args=tuple(script_args)) if script else None)


def node_parser(*, script: bool = False, description: str | None = None) -> argparse.ArgumentParser:
    """The argparse definition of the in-job command line (``script``: job mode's too)."""
    p = argparse.ArgumentParser(
        prog=f"python -m {SCRIPT_MODULE if script else NODE_MODULE}", description=description
    )
    p.add_argument("--role", choices=["cluster", "workers"], default="cluster")
    p.add_argument("--name-prefix", required=True, help="worker names are PREFIX-RANK-INDEX")
    p.add_argument("--processes", type=int, default=1, help="worker processes per node")
    p.add_argument("--threads", type=int, help="threads per worker (default: cores/processes)")
    p.add_argument("--memory-limit", type=_memory_limit, default="auto")
    p.add_argument("--scheduler-port", type=int, default=8786)
    p.add_argument("--dashboard-port", type=int, default=8787)
    p.add_argument("--scheduler-address", default=None, help="for --role workers")
    p.add_argument("--no-worker-on-scheduler", dest="worker_on_scheduler", action="store_false")
    p.add_argument("--death-timeout", type=float, default=300.0)
    p.add_argument("--idle-timeout", type=float, default=None)
    p.add_argument("--no-client-timeout", type=float, default=None)
    p.add_argument("--first-contact-timeout", type=float, default=None)
    p.add_argument("--job-timeout", type=float, default=None)
    p.add_argument("--scheduler-options", type=json.loads, default={})
    p.add_argument("--worker-options", type=json.loads, default={})
    p.add_argument("--cuda", action="store_true", help="dask-cuda workers, one per GPU")
    if script:
        job = p.add_argument_group("job mode", "the script rank 0 runs; its arguments follow --")
        job.add_argument("--script", default=None, help="script path (code snapshot)")
        job.add_argument("--wait-workers", type=float, default=300.0)
    return p


def node_command(opts: NodeOptions) -> str:
    """The shell command every node of the job runs (``python -m MODULE ARGS``)."""
    return shlex.join(["python", "-m", opts.module, *opts.to_argv()])


def cluster_settings(
    node: NodeOptions, distribution: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The settings of a cluster that :data:`SETTINGS_TAG` carries, by setting name.

    From the main job's ``node`` options, ``distribution`` and ``extra`` (JSON values);
    unset ones are left out (a reconnecting client uses its own defaults).
    """
    settings = {
        "processes_per_node": node.processes,
        "threads_per_process": node.threads or None,
        "memory_limit": node.memory_limit,
        "worker_on_scheduler": node.worker_on_scheduler,
        "scheduler_port": node.scheduler_port,
        "dashboard_port": node.dashboard_port,
        "death_timeout": node.death_timeout,
        "idle_timeout": node.idle_timeout,
        "no_client_timeout": node.no_client_timeout,
        "distribution": distribution,
        "scheduler_options": dict(node.scheduler_options) or None,
        "worker_options": dict(node.worker_options) or None,
        **dict(extra or {}),
    }
    return {k: v for k, v in settings.items() if v is not None}


def settings_tag(settings: Mapping[str, Any]) -> dict[str, str]:
    """The job tag that stores ``settings`` (see :func:`cluster_settings`)."""
    return {SETTINGS_TAG: json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))}


def read_settings_tag(tags: Mapping[str, str] | None) -> dict[str, Any]:
    """The settings stored by :func:`settings_tag`; ValueError if missing or not an object."""
    value = json.loads((tags or {}).get(SETTINGS_TAG) or "null")
    if not isinstance(value, dict):
        raise ValueError(f"no {SETTINGS_TAG} tag holding a JSON object")
    return value


def _number(value: float) -> str:
    """A number for the command line, exactly (no ``:g`` rounding of large values)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _memory_limit(text: str) -> str | int | float:
    """``--memory-limit``: a number stays a number (bytes, or a fraction), else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- job naming: one rule for the client, the scheduler plugins and the CLI ------------


def main_job_name(cluster_name: str) -> str:
    """The AML job that runs a cluster's scheduler (never retired while the cluster runs)."""
    return f"{cluster_name}-main"


def worker_job_name(cluster_name: str, number: int, series: str = "") -> str:
    """The ``number``-th extra worker job of a cluster object (numbers are never reused).

    AML job names are unique forever. A reconnected object (``from_name``) cannot know the
    numbers earlier objects used: it numbers a ``series`` (random token) of its own.
    """
    return f"{cluster_name}-w{number}-{series}" if series else f"{cluster_name}-w{number}"


def cluster_key_tag(cluster_name: str) -> str:
    """A job tag key only the jobs of cluster ``cluster_name`` carry (its value: the job's role).

    AML's job list filters by tag key (``GET /jobs?tag=KEY``), not by value: watching a
    cluster costs one request however many clusters the workspace has run.
    """
    return f"{TAG_CLUSTER}.{cluster_name}"


def is_main_job(job_name: str, cluster_name: str) -> bool:
    """True for the cluster's main job: the one scaling must never close."""
    return job_name == main_job_name(cluster_name)


#: Outcomes of :func:`probe`.
OPEN, REFUSED, UNANSWERED = "open", "refused", "unanswered"


async def probe(address: str, timeout: float) -> str:
    """Try one TCP connection to the Dask ``address`` (client and node side's one probe).

    Returns :data:`OPEN` (something listens), :data:`REFUSED` (the host answered but
    nothing listens) or :data:`UNANSWERED` (no answer within ``timeout``, no route).
    """
    try:  # not asyncio.wait_for: before 3.12 it can swallow a cancel (cpython gh-86296)
        conn = asyncio.open_connection(*get_address_host_port(address))
        _, writer = await wait_for(conn, timeout)
    except ConnectionRefusedError:
        return REFUSED
    except (OSError, asyncio.TimeoutError):
        return UNANSWERED
    writer.close()
    return OPEN
