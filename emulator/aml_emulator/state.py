"""In-memory model of the emulated workspace: computes, node slots, jobs, environments.

Everything here is plain data touched only from the emulator's event loop
thread (public accessors on :class:`~aml_emulator.Emulator`
hop onto that loop), so no locking is needed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from .config import ComputeSpec
from .identity import run_token

ACTIVE_STATUSES = (
    "NotStarted",
    "Starting",
    "Provisioning",
    "Queued",
    "Preparing",
    "Running",
    "Finalizing",
    "CancelRequested",
)
TERMINAL_STATUSES = ("Completed", "Failed", "Canceled", "NotResponding", "Paused")


@dataclass
class NodeRecord:
    """One node allocated to a job (one process group on this machine)."""

    rank: int
    slot: int
    ip: str
    node_id: str
    workdir: str
    log_path: str
    state: str = "preparing"
    pid: int | None = None
    exit_code: int | None = None
    ssh_port: int | None = None
    host_public_key: str | None = None
    killed_reason: str | None = None
    stderr_tail: list[str] = field(default_factory=list)
    process: Any = None
    ssh_server: Any = None

    def as_dict(self) -> dict[str, Any]:
        """Return the public view of the node.

        Returns
        -------
        dict
            ``rank, ip, node_id, pid, state, ssh_port, exit_code, log_path,
            host_public_key, workdir``.
        """
        return {
            "rank": self.rank,
            "ip": self.ip,
            "node_id": self.node_id,
            "pid": self.pid,
            "state": self.state,
            "ssh_port": self.ssh_port,
            "exit_code": self.exit_code,
            "log_path": self.log_path,
            "host_public_key": self.host_public_key,
            "workdir": self.workdir,
        }


@dataclass
class JobRecord:
    """A submitted job: the request body as sent plus runtime state."""

    name: str
    properties: dict[str, Any]
    compute: str
    instance_count: int
    created: float = field(default_factory=time.time)
    #: ``(time.monotonic(), status)`` at each change of ``status``, oldest first: what a
    #: job list that lags shows (``Emulator.set_job_list_lag``). Declared before ``status``.
    status_log: list[tuple[float, str]] = field(default_factory=list, repr=False)
    status: str = "NotStarted"
    start_time: float | None = None
    end_time: float | None = None
    error: dict[str, Any] | None = None
    mlflow_tags: dict[str, str] = field(default_factory=dict)
    #: The run's ``MLFLOW_TRACKING_TOKEN``: what the job's nodes present to the tracking
    #: endpoint (as AML gives each job a token for its run); never in a response or log.
    tracking_token: str = field(default="", repr=False)
    mlflow_params: dict[str, str] = field(default_factory=dict)
    mlflow_metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    nodes: list[NodeRecord] = field(default_factory=list)
    slots: list[int] | None = None
    timeout_seconds: float | None = None
    cancel_reason: str | None = None
    failure: dict[str, str] | None = None
    task: Any = None
    done: Any = None  # asyncio.Event set when the job reaches a terminal status
    wake: Any = None  # asyncio.Event set to interrupt the job's waits
    #: The job's image build log (``azureml-logs/20_image_build_log.txt``), once a build began.
    build_log_path: str | None = None
    #: The built virtualenv the nodes run in; None: the emulator's own interpreter.
    venv: str | None = None
    #: Object id (``oid``) of the identity that submitted the job; None when the
    #: submitting request carried no token the emulator accepts.
    owner: str | None = None
    #: Set when a preemption makes AML run the job again (see ``Engine.kill_node``).
    requeue: bool = False
    #: How many times the job was run again after a preemption.
    attempts: int = 0
    #: While ``Queued`` for want of vCPU quota: why (AML's "must wait in a queue until
    #: quota is available"); None otherwise.
    queue_reason: str | None = None
    #: Run-history warnings (``{"source", "message"}``), e.g. that the job waited for quota.
    warnings: list[dict[str, str]] = field(default_factory=list)
    #: ``[emulator]`` lines from before the nodes existed (the build): each node log starts with them.
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tracking_token:
            self.tracking_token = run_token(self.name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "status" and value != self.__dict__.get("status"):
            self.status_log.append((time.monotonic(), value))
        super().__setattr__(name, value)

    def status_at(self, when: float) -> str:
        """The status the job had at ``when`` (``time.monotonic()``; its first one before it)."""
        status = self.status_log[0][1] if self.status_log else self.status
        for changed, value in self.status_log:
            if changed > when:
                break
            status = value
        return status

    @property
    def is_terminal(self) -> bool:
        """Whether the job has finished (Completed/Failed/Canceled)."""
        return self.status in TERMINAL_STATUSES

    @property
    def experiment_name(self) -> str:
        """The submitted ``experimentName`` (``"Default"`` when there is none)."""
        return self.properties.get("experimentName") or "Default"

    @property
    def display_name(self) -> str:
        """The submitted ``displayName`` (the job name when there is none)."""
        return self.properties.get("displayName") or self.name

    @property
    def tags(self) -> dict[str, str]:
        """Submitted tags merged with tags set through mlflow."""
        tags = dict(self.properties.get("tags") or {})
        tags.update(self.mlflow_tags)
        return tags


@dataclass
class ComputeState:
    """A compute target and the node slots in use on it."""

    spec: ComputeSpec
    index: int
    net: int = 0
    created: float = field(default_factory=time.time)
    slots: list[str | None] = field(default_factory=list)
    freed_at: dict[int, float] = field(default_factory=dict)
    queue: list[str] = field(default_factory=list)
    #: Per slot, which VM holds it: a new number each time a new VM is allocated
    #: behind the slot (after scale-down or preemption), 0 until then.
    generations: dict[int, int] = field(default_factory=dict)
    #: ``Creating`` / ``Deleting`` while a create or delete operation runs, else ``Succeeded``.
    provisioning_state: str = "Succeeded"
    #: The implicit pool of one serverless job (not listed, not addressable by name).
    serverless: bool = False

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = [None] * self.spec.max_nodes

    def resize(self, max_nodes: int) -> None:
        """Change the number of slots (``maxNodeCount``); trailing slots must be free.

        Parameters
        ----------
        max_nodes
            New maximum node count.

        Raises
        ------
        ValueError
            If a slot that would go is held by a job.
        """
        if any(s is not None for s in self.slots[max_nodes:]):
            raise ValueError(f"{self.spec.name}: nodes beyond {max_nodes} are in use")
        for i in range(max_nodes, len(self.slots)):
            self.freed_at.pop(i, None)
        self.slots = self.slots[:max_nodes] + [None] * (max_nodes - len(self.slots))
        self.spec.max_nodes = max_nodes

    @property
    def allocated(self) -> int:
        """Nodes whose VM is allocated: held by jobs, or idle before scale-down."""
        return self.in_use + len(self.idle_slots())

    def new_vms(self, count: int) -> int:
        """How many new VMs :meth:`allocate` would bring up for ``count`` nodes.

        Parameters
        ----------
        count
            Nodes requested (at most :attr:`free`).

        Returns
        -------
        int
            Chosen slots whose VM is not allocated yet (idle VMs are reused).
        """
        allocated = set(self.idle_slots())
        return sum(1 for i in self._choose(count) if i not in allocated)

    def _choose(self, count: int) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None][:count]

    def ip_for_slot(self, slot: int) -> str:
        """Return the loopback "private IP" of a node slot.

        Parameters
        ----------
        slot
            Slot index, 0-based.

        Returns
        -------
        str
            ``127.{net}.{compute index + 1}.{slot + 1}`` (``net`` is claimed
            per emulator, see :mod:`aml_emulator.netclaim`).
        """
        return f"127.{self.net}.{self.index + 1}.{slot + 1}"

    def node_id_for_slot(self, slot: int) -> str:
        """Return the AML-looking node id of the VM that holds a slot now.

        It stays the same while the VM stays allocated (across jobs, while idle)
        and changes when a new VM takes the slot (see :meth:`allocate`).

        Parameters
        ----------
        slot
            Slot index.

        Returns
        -------
        str
            e.g. ``tvmps_3f2a..._d``.
        """
        generation = self.generations.get(slot, 0)
        seed = f"{self.spec.name}/{slot}" + (f"/{generation}" if generation else "")
        digest = hashlib.sha256(seed.encode()).hexdigest()[:40]
        return f"tvmps_{digest}_d"

    @property
    def in_use(self) -> int:
        """Number of slots held by jobs."""
        return sum(1 for s in self.slots if s is not None)

    @property
    def free(self) -> int:
        """Number of free slots."""
        return len(self.slots) - self.in_use

    def allocate(self, job_name: str, count: int) -> list[int]:
        """Take ``count`` free slots for a job, preferring warm (recently freed) ones.

        A slot whose VM is still allocated (idle, see :meth:`idle_slots`) keeps
        it; any other slot gets a new VM (a new node id, and a new host key for
        its SSH endpoint), as AML allocates a fresh VM after a scale-down.

        Parameters
        ----------
        job_name
            The job taking the slots.
        count
            Number of slots.

        Returns
        -------
        list of int
            Slot indices, rank order.

        Raises
        ------
        RuntimeError
            If fewer than ``count`` slots are free.
        """
        chosen = self._choose(count)
        if len(chosen) < count:
            raise RuntimeError(f"{self.spec.name}: {count} nodes requested, {self.free} free")
        allocated = set(self.idle_slots())  # free slots whose VM is still allocated
        for i in chosen:
            if i not in allocated:  # scaled down (or never allocated): a new VM
                self.generations[i] = self.generations.get(i, 0) + 1
            self.slots[i] = job_name
            self.freed_at.pop(i, None)
        return chosen

    def release(self, slot: int, lost: bool = False) -> None:
        """Free a slot; it stays listed as idle until the scale-down time passes.

        Parameters
        ----------
        slot
            Slot index.
        lost
            The VM is gone (a preempted low-priority node): the slot is not idle,
            and a VM that takes it later (``min_nodes`` included) is a new one.
        """
        self.slots[slot] = None
        if lost:
            self.freed_at.pop(slot, None)
            self.generations[slot] = self.generations.get(slot, 0) + 1
        else:
            self.freed_at[slot] = time.time()

    def idle_slots(self, now: float | None = None) -> list[int]:
        """Return free slots that still count as allocated idle nodes.

        A freed node stays for ``idle_seconds_before_scaledown``; the compute
        also keeps ``min_nodes`` nodes at all times.

        Parameters
        ----------
        now
            Current POSIX time.

        Returns
        -------
        list of int
            Slot indices reported as ``idle``.
        """
        now = time.time() if now is None else now
        idle_for = self.spec.idle_seconds_before_scaledown
        warm = [
            i
            for i, s in enumerate(self.slots)
            if s is None and now - self.freed_at.get(i, -1e18) < idle_for
        ]
        need = self.spec.min_nodes - self.in_use - len(warm)
        if need > 0:
            cold = [i for i, s in enumerate(self.slots) if s is None and i not in warm]
            warm.extend(cold[:need])
        return sorted(warm)


@dataclass
class EnvironmentVersion:
    """A registered environment version."""

    name: str
    version: str
    properties: dict[str, Any]
    created: float = field(default_factory=time.time)
