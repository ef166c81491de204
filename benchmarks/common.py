"""Shared helpers of the benchmark suites: emulator process, request counting, timing.

Every suite measures a *subject* (dask-amlcompute) against a *baseline* in the
same run, interleaving the two and reporting the median of the per-pair
ratios, because other jobs share this machine and absolute times drift.

The AML emulator runs as its own process (``python -m
aml_emulator.cli``), as AML runs outside the client: its HTTP and
SSH servers then do not compete with the client for the GIL.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from azure.core.pipeline.policies import SansIOHTTPPolicy

BENCH_DIR = Path(__file__).resolve().parent
DASK_CLI = str(Path(sys.executable).with_name("dask"))


# -- results -----------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table.

    Parameters
    ----------
    suite
        Suite name (``startup``, ``tunnel``, ...).
    metric
        What was measured, in words.
    value
        The figure: a ratio against the same-run baseline, or a count.
    unit
        ``"x"`` for a ratio, or the unit of a count (``"req"``, ``"req/min"``).
    target
        The target in words (empty when there is none).
    met
        True / False against the target, None when there is no target.
    detail
        Raw medians and context (machine-load dependent, not comparable across runs).
    """

    suite: str
    metric: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None
    detail: str = ""

    def formatted(self) -> str:
        """The value as printed: ``1.23x`` for ratios, ``4.0 req/min`` for counts."""
        if self.unit == "x":
            return f"{self.value:.2f}x"
        return f"{self.value:g} {self.unit}"

    def status(self) -> str:
        """``met``, ``MISSED`` or ``-``."""
        return {True: "met", False: "MISSED", None: "-"}[self.met]


@dataclass
class SuiteResult:
    """Rows and free-text notes of one suite."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """Run options passed to every suite.

    Parameters
    ----------
    quick
        Fewer repetitions and smaller workloads (``--quick``).
    workdir
        A temporary directory for this run (keys, configs, logs).
    sizes
        Cluster sizes to measure, for the suites that take them (``--sizes``; empty: theirs).
    pairs
        Measured pairs per size, for the suites that take them (``--pairs``; None: theirs).
    """

    quick: bool
    workdir: Path
    sizes: tuple[int, ...] = ()
    pairs: int | None = None

    def pick(self, full: Any, quick: Any) -> Any:
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full


# -- timing ------------------------------------------------------------------


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took (monotonic clock)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(
    baseline: Callable[[], float],
    subject: Callable[[], float],
    reps: int,
    warmup: int = 1,
) -> tuple[list[float], list[float]]:
    """Run baseline and subject alternately; each returns its own measurement.

    The order flips every repetition (B S, S B, ...) so a drift in machine
    load hits both sides alike. Warm-up pairs are run and discarded.

    Parameters
    ----------
    baseline, subject
        Callables returning one measurement each (seconds or a rate).
    reps
        Measured pairs.
    warmup
        Discarded pairs run first.

    Returns
    -------
    tuple of list
        Baseline and subject measurements, pair by pair.
    """
    for _ in range(warmup):
        baseline()
        subject()
    base, subj = [], []
    for i in range(reps):
        if i % 2 == 0:
            base.append(baseline())
            subj.append(subject())
        else:
            subj.append(subject())
            base.append(baseline())
    return base, subj


def pair_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-pair ratios ``numerators[i] / denominators[i]``."""
    return median([n / d for n, d in zip(numerators, denominators, strict=True)])


def fmt_s(values: list[float]) -> str:
    """``median 1.23s (n=5)`` for a detail column."""
    return f"median {median(values):.3g}s (n={len(values)})"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05):
    """Poll ``predicate`` until true; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


# -- processes ---------------------------------------------------------------


def spawn(cmd: list[str], log: Path, **kwargs: Any) -> subprocess.Popen:
    """Start ``cmd`` in its own session with stdout+stderr appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )


@contextlib.contextmanager
def listening_process(cmd: list[str], log: Path, port: int, what: str) -> Iterator[int]:
    """:func:`spawn` ``cmd``, wait until it listens on ``127.0.0.1:port``; yield its PID, stop it.

    Raises ``RuntimeError`` naming ``what`` and ``log`` if it exits first.
    """
    proc = spawn(cmd, log)

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}; see {log}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 30, f"{what} to listen")
        yield proc.pid
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process we started (by PID), then SIGKILL its own process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # The process was started with start_new_session: its group id is its PID and
    # holds only processes it started (e.g. a nanny's worker).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process we started (by PID) at once, then reap each by its PID."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        stop_process(proc)


def plain_dask_start(
    workdir: Path,
    n: int,
    rep: list[int],
    memory_limit: str | None = None,
    on_ready: Callable[[Any, float], None] | None = None,
    closed: list[float] | None = None,
    python: tuple[str, dict[str, str]] | None = None,
) -> float:
    """Seconds from launching ``dask scheduler`` + ``n`` ``dask worker`` to a client with ``n``.

    The baseline of the start-up suites: the same workers (one thread each) with
    nothing but Dask, timed the same way (until the client sees every worker).

    Parameters
    ----------
    workdir
        Folder of the scheduler file and the processes' log.
    n
        Workers to launch.
    rep
        A one-item counter making each scheduler file name new.
    memory_limit
        ``--memory-limit`` of each worker (None: Dask's default).
    on_ready
        Called with ``(client, elapsed)`` once every worker joined.
    closed
        If given, the cluster is closed with ``client.shutdown()``; receives the seconds
        until every process exited.
    python
        Another virtualenv's ``bin`` folder and the processes' environment (None: this
        interpreter's ``dask``); its workers run without a dashboard, as a cluster's do.
    """
    rep[0] += 1
    sched_file = workdir / f"plain-scheduler-{n}-{rep[0]}.json"
    log = workdir / "plain-dask.log"
    limit = ["--memory-limit", memory_limit] if memory_limit else []
    dask_cli, env = (DASK_CLI, None) if python is None else (f"{python[0]}/dask", python[1])
    limit += [] if python is None else ["--no-dashboard"]
    start = time.perf_counter()
    procs = [
        spawn(
            [dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
            log,
            env=env,
        )
    ]  # fmt: skip
    try:
        for _ in range(n):
            procs.append(
                spawn(
                    [dask_cli, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                     *limit, "--host", "127.0.0.1", "--death-timeout", "60"],
                    log,
                    env=env,
                )
            )  # fmt: skip
        wait_until(sched_file.exists, 60 + 3 * n, "the scheduler file", step=0.01)
        from distributed import Client

        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(n, timeout=60 + 5 * n)
            elapsed = time.perf_counter() - start
            if on_ready is not None:
                on_ready(client, elapsed)
            if closed is not None:  # Dask's own cluster close: the scheduler stops its workers
                stopping = time.perf_counter()
                client.shutdown()
                wait_until(lambda: all(p.poll() is not None for p in procs), 60, "plain dask exit")
                closed.append(time.perf_counter() - stopping)
    finally:
        stop_all(procs)
    return elapsed


def tree_cpu_seconds(pid: int | None = None, with_root: bool = True) -> float:
    """CPU seconds used so far by process ``pid`` (None: this one) and its descendants.

    Exited children that were waited for count too (``children_user``/``children_system``);
    ``with_root=False`` leaves the process itself out (e.g. the emulator: only its nodes).
    """
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)][0 if with_root else 1 :]:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# -- AML request counting ----------------------------------------------------


class RequestCounter(SansIOHTTPPolicy):
    """An azure-core per-call policy counting the SDK's requests, by route.

    Passed to the ``MLClient`` as ``per_call_policies=[counter]``, it sees every
    request of every operation group (ARM, run history, LRO polls).
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.total = 0
        self.routes: Counter[str] = Counter()

    def on_request(self, request: Any) -> None:
        """Count one outgoing request (azure-core policy hook)."""
        http = request.http_request
        path = re.sub(r"^https?://[^/]+|\?.*$", "", http.url)
        path = re.sub(
            r"^/subscriptions/[^/]+(/resourceGroups/[^/]+)?"
            r"/providers/Microsoft\.MachineLearningServices(/workspaces/[^/]+)?",
            "",
            path,
        )
        path = re.sub(r"^.*/workspaces/[^/]+", "", path) or "/workspace"
        route = re.sub(r"/(jobs|computes|runs|versions)/[^/]+", r"/\1/{name}", path)
        route = re.sub(r"/(mfeOperationsStatus|mfeOperationResults)/[^/]+", r"/\1/{op}", route)
        with self._lock:
            self.total += 1
            self.routes[f"{http.method} {route}"] += 1

    def snapshot(self) -> tuple[int, Counter[str]]:
        """Current total and a copy of the per-route counts."""
        with self._lock:
            return self.total, Counter(self.routes)


def route_summary(before: Counter[str], after: Counter[str], top: int = 4) -> str:
    """The routes requested between two snapshots, most frequent first."""
    diff = after - before
    return ", ".join(f"{route} x{n}" for route, n in diff.most_common(top)) or "none"


# -- the emulator ------------------------------------------------------------


class EmulatorProcess:
    """The AML emulator as a separate process (``python -m aml_emulator.cli``).

    Parameters
    ----------
    workdir
        Directory for its config file and log.
    computes
        ``ComputeSpec`` fields, one dict per compute.
    provisioning_delay
        Seconds each job spends in ``Preparing``.
    env
        Extra environment variables of the emulator process.
    **config
        More emulator settings (``environment_cache``, ``build_environments``, ...).

    Examples
    --------
    >>> with EmulatorProcess(Path("/tmp"), [{"name": "bench", "max_nodes": 3}]) as emu:
    ...     ml = emu.ml_client()  # doctest: +SKIP
    """

    def __init__(
        self,
        workdir: Path,
        computes: list[dict[str, Any]],
        provisioning_delay: float = 0.0,
        env: dict[str, str] | None = None,
        **config: Any,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="emulator-", dir=workdir))
        self.config = {
            "provisioning_delay": provisioning_delay,
            "workdir": str(self.workdir),
            "computes": computes,
            **config,
        }
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def start(self, timeout: float = 60.0) -> EmulatorProcess:
        """Start the emulator and wait until it serves."""
        path = self.workdir / "emulator.json"
        path.write_text(json.dumps(self.config))
        log = open(self.workdir / "emulator.log", "ab")  # noqa: SIM115  closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aml_emulator.cli", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:  # keep draining stdout so the emulator never blocks on it
            for line in self.proc.stdout:  # type: ignore[union-attr]
                lines.put(line)

        threading.Thread(target=pump, daemon=True, name="emulator-stdout").start()
        deadline = time.monotonic() + timeout
        while not self.base_url:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the emulator did not start; see {self.workdir}/emulator.log")
            with contextlib.suppress(queue.Empty):
                match = re.search(r"serving at (\S+)", lines.get(timeout=min(left, 0.5)))
                if match:
                    self.base_url = match.group(1)
        return self

    def stop(self) -> None:
        """Stop the emulator by its PID; it kills every node it started."""
        if self.proc is not None:
            stop_process(self.proc, timeout=30)
            self.proc = None
            self._log.close()

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ml_client(self, counter: RequestCounter | None = None) -> Any:
        """A real ``MLClient`` pointed at the emulator, optionally counting requests."""
        from aml_emulator import make_ml_client

        kwargs = {"per_call_policies": [counter]} if counter is not None else {}
        return make_ml_client(self.base_url, **kwargs)

    def status(self) -> dict[str, Any]:
        """The emulator's ``/emulator/status`` document (not an AML request)."""
        resp = requests.get(f"{self.base_url}/emulator/status", timeout=10)
        resp.raise_for_status()
        return resp.json()

    def in_use(self, compute: str) -> int:
        """Nodes of ``compute`` held by jobs."""
        return int(self.status()["computes"][compute]["in_use"])

    def node(self, job: str, rank: int) -> dict[str, Any]:
        """The emulator's record of one node of a job (ip, ssh_port, host key...)."""
        return self.status()["jobs"][job]["nodes"][rank]

    def active_jobs(self, prefix: str = "") -> list[str]:
        """Unfinished jobs whose name starts with ``prefix``."""
        doc = self.status()
        done = set(doc["terminal_statuses"])
        return [
            n for n, j in doc["jobs"].items() if n.startswith(prefix) and j["status"] not in done
        ]


# -- clusters ----------------------------------------------------------------


def cluster_kwargs(compute: str, **extra: Any) -> dict[str, Any]:
    """Arguments of a benchmark ``AmlComputeCluster``: library defaults, bounded waits.

    Polling settings (``poll_interval``, ``watch_interval``) stay at the library
    defaults, since those are what a user gets.
    """
    kwargs: dict[str, Any] = {
        "compute": compute,
        "threads_per_process": 1,
        "job_timeout": "30m",
        "startup_timeout": "3m",
        "death_timeout": "60s",
        "experiment_name": "benchmarks",
        "quiet": True,
    }
    kwargs.update(extra)
    return kwargs


@contextlib.contextmanager
def aml_cluster(emu: EmulatorProcess, ml_client: Any, **kwargs: Any) -> Iterator[Any]:
    """An ``AmlComputeCluster``, closed on exit; checks that no job of it is left running."""
    from dask_amlcompute import AmlComputeCluster

    cluster = AmlComputeCluster(ml_client, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()
        wait_until(lambda: not emu.active_jobs(cluster.name), 60, f"jobs of {cluster.name} to end")


def shippable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make a benchmark function run on the nodes, where this directory is not importable.

    Dask pickles a graph with plain pickle first, which stores module-level
    functions by reference (``common.no_op``) and the scheduler then fails to
    import them. A wrapper that plain pickle refuses is shipped by value by
    cloudpickle instead...
    """
    import functools

    import cloudpickle

    # ... and whatever it calls from a benchmark module is then shipped by value too.
    cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__qualname__ = f"<locals>.{fn.__name__}"  # not importable: pickled by value
    return call


def _no_op(x: Any) -> Any:
    return x


#: The task of the throughput benchmarks.
no_op = shippable(_no_op)


def map_rate(client: Any, n: int) -> float:
    """Tasks per second of ``client.map(no_op, range(n))`` + gather."""

    def work() -> None:
        futures = client.map(no_op, range(n), pure=False)
        client.gather(futures)
        del futures

    return n / timed(work)


def ssh_keypair(workdir: Path) -> tuple[Path, str]:
    """A fresh ed25519 client key written 0600 under ``workdir``; returns (path, public line)."""
    from aml_emulator.ssh import generate_client_keypair

    private, public = generate_client_keypair(comment="benchmarks@dask-amlcompute")
    path = workdir / "id_ed25519"
    path.write_text(private)
    os.chmod(path, 0o600)
    return path, public
