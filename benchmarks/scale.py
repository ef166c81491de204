"""Issue 17: how a cluster's cost grows with its size, on the emulator.

Three curves, every point measured in this run:

- **nodes vs start-up ratio.** Subject: ``AmlComputeCluster(n_nodes=N,
  threads_per_process=1, memory_limit="300MiB")`` on an emulator with zero
  provisioning delay and ``build_environments=False`` (nodes run the real node
  entry point on the emulator's interpreter), default ``connect`` and polling,
  timed until a ``Client`` sees its N workers (rank 0 runs the scheduler and a
  worker). Baseline: ``dask scheduler`` + N ``dask worker --nthreads 1
  --memory-limit 300MiB`` processes launched at once, timed until a ``Client``
  sees N workers. Both sides start N nannies, each with its worker process;
  they alternate (B S / S B) and the median of the per-pair ratios is reported.
- **nodes vs AML requests/min** at steady state, for a main job of N nodes.
- **worker jobs vs AML requests/min** at steady state, for a one-node main job
  plus K one-node worker jobs (``nodes_per_job=1``, ``scale(nodes=1 + K)``).

Requests are counted as in ``control_plane.py`` (an azure-core per-call policy on
the ``MLClient``). In steady state a cluster's only AML caller is its job watch,
one job list per ``watch_interval``. To keep the suite short the request curves
use a lowered ``watch_interval`` W and a window of exactly k watch polls (it
starts just after a poll and lasts k*W + W/2). Watch requests (the job list and
a ``GET /jobs/{name}`` for a watched job the list lacks) are reported per poll
and scaled to the default interval, (requests / k) x 60 / 30 per minute; any
other request is added at its measured rate per minute, unscaled.

Also the client process's CPU seconds and RSS for the largest cluster: to start
it, at steady state with default settings, and to close it.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from common import (
    EmulatorProcess,
    Options,
    RequestCounter,
    Row,
    SuiteResult,
    aml_cluster,
    cluster_kwargs,
    fmt_s,
    interleave,
    median,
    pair_ratio,
    plain_dask_start,
    route_summary,
    wait_until,
)
from control_plane import TARGET_STEADY_PER_MIN, Meter
from dask.utils import parse_timedelta
from distributed import Client

SUITE = "scale"
COMPUTE = "bench-scale"
#: The compute's max nodes: the largest cluster, and 1 + the most worker jobs, must fit.
MAX_NODES = 48
MEMORY_LIMIT = "300MiB"
#: Cluster sizes (nodes) of the start-up and nodes-vs-requests curves.
NODES, QUICK_NODES = (2, 4, 8, 16, 32), (2, 4)
#: The start-up target (issue 17) applies up to this many nodes.
STARTUP_TARGET, STARTUP_TARGET_UP_TO = 1.2, 16
#: Worker jobs of the worker-jobs-vs-requests curve (the last: issue 17's 40).
WORKER_JOBS, QUICK_WORKER_JOBS = (1, 10, 40), (1, 4)
#: The job list of the watch, and the per-job GET it adds for a job the list lacks.
WATCH_ROUTES = ("GET /jobs", "GET /jobs/{name}")
LIST_ROUTE = WATCH_ROUTES[0]


def default_watch_interval() -> float:
    """The ``watch_interval`` a cluster gets when none is given (dask config, default 30 s)."""
    from dask_amlcompute.config import get

    return float(parse_timedelta(get("watch-interval")))


def client_cpu() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    times = os.times()
    return times.user + times.system


def client_rss_mib() -> float:
    """Resident memory of this process, MiB."""
    return psutil.Process().memory_info().rss / 2**20


@dataclass
class Start:
    """One timed start and what it cost the client process.

    Parameters
    ----------
    seconds
        Wall time to a client with every worker.
    cpu
        Client CPU seconds over that time.
    rss
        Client RSS (MiB) once the workers are in.
    phases
        The cluster's ``startup_phases`` (empty for the baseline).
    """

    seconds: float
    cpu: float
    rss: float
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Hold:
    """Client cost of keeping the largest cluster running, then closing it (default settings).

    Parameters
    ----------
    seconds, cpu
        How long it was kept after its timed start, and the client CPU seconds meanwhile.
    rss
        Client RSS (MiB) at the end of that time.
    close_seconds, close_cpu
        Wall time and client CPU seconds of ``cluster.close()``.
    """

    seconds: float = 0.0
    cpu: float = 0.0
    rss: float = 0.0
    close_seconds: float = 0.0
    close_cpu: float = 0.0


# -- the baseline: plain dask processes ---------------------------------------


def plain_start(workdir: Path, n: int, rep: list[int], samples: list[Start]) -> float:
    """The plain-Dask baseline with ``n`` workers of :data:`MEMORY_LIMIT`; its cost to ``samples``."""
    cpu0 = client_cpu()

    def measured(_client: Any, elapsed: float) -> None:
        samples.append(Start(elapsed, client_cpu() - cpu0, client_rss_mib()))

    return plain_dask_start(workdir, n, rep, MEMORY_LIMIT, measured)


# -- the subject: AmlComputeCluster --------------------------------------------


def aml_start(
    emu: EmulatorProcess,
    ml_client: Any,
    n: int,
    samples: list[Start],
    hold: Hold | None = None,
    hold_seconds: float = 0.0,
) -> float:
    """Seconds from ``AmlComputeCluster(n_nodes=n)`` to a client with its ``n`` workers.

    Parameters
    ----------
    emu, ml_client
        The emulator and an ``MLClient`` on it.
    n
        Nodes of the cluster (rank 0: the scheduler and a worker; others: a worker).
    samples
        Receives the client's cost of this start.
    hold
        If given, after the timed start keep the cluster ``hold_seconds`` and then close
        it, recording the client's CPU and RSS meanwhile into ``hold``.
    hold_seconds
        How long to hold.
    """
    kwargs = cluster_kwargs(COMPUTE, n_nodes=n, memory_limit=MEMORY_LIMIT, startup_timeout="5m")
    cpu0, start = client_cpu(), time.perf_counter()
    with aml_cluster(emu, ml_client, **kwargs) as cluster:
        with Client(cluster, timeout=60) as client:
            client.wait_for_workers(n, timeout=60 + 5 * n)
            elapsed = time.perf_counter() - start
            samples.append(
                Start(elapsed, client_cpu() - cpu0, client_rss_mib(), cluster.startup_phases)
            )
            if hold is not None:
                cpu1, t1 = client_cpu(), time.perf_counter()
                time.sleep(hold_seconds)
                hold.seconds, hold.cpu = time.perf_counter() - t1, client_cpu() - cpu1
                hold.rss = client_rss_mib()
        if hold is not None:
            cpu2, t2 = client_cpu(), time.perf_counter()
            cluster.close()
            hold.close_seconds, hold.close_cpu = time.perf_counter() - t2, client_cpu() - cpu2
    return elapsed


# -- steady-state requests -----------------------------------------------------


@dataclass
class Steady:
    """AML requests over a window of exactly ``polls`` watch polls.

    Parameters
    ----------
    watch
        The ``watch_interval`` of the measured cluster, seconds.
    polls
        Watch polls in the window.
    seconds
        Length of the window.
    routes
        Requests in the window, by route.
    default_watch
        The default ``watch_interval`` the rate is scaled to.
    """

    watch: float
    polls: int
    seconds: float
    routes: Counter[str]
    default_watch: float

    @property
    def watch_requests(self) -> int:
        """Requests the job watch sent (job lists, and GETs of jobs the list lacked)."""
        return sum(self.routes[r] for r in WATCH_ROUTES)

    @property
    def other_requests(self) -> int:
        """Any other request (not tied to the watch interval)."""
        return sum(self.routes.values()) - self.watch_requests

    def per_poll(self) -> float:
        """Watch requests per watch interval."""
        return self.watch_requests / self.polls

    def per_min(self) -> float:
        """Requests per minute at the default watch interval (see the module docstring)."""
        watch = self.per_poll() * 60 / self.default_watch
        return round(watch + self.other_requests * 60 / self.seconds, 2)

    def detail(self) -> str:
        """Counts, the scaling and the routes, for the detail column."""
        raw = sum(self.routes.values()) * 60 / self.seconds
        return (
            f"{sum(self.routes.values())} requests in {self.polls} watch polls "
            f"(watch_interval={self.watch:g}s, {self.seconds:.1f}s, {raw:.1f}/min at that "
            f"interval): {self.per_poll():g} watch request(s)/poll x 60/{self.default_watch:g}"
            f" + {self.other_requests} other; {route_summary(Counter(), self.routes)}"
        )


def measure_steady(counter: RequestCounter, watch: float, polls: int) -> Steady:
    """Count requests over ``polls`` watch polls, starting just after one.

    The window starts right after a job list and lasts ``polls * watch + watch / 2``:
    it holds exactly ``polls`` polls of a watch that lists every ``watch`` seconds.
    """
    listed = counter.snapshot()[1][LIST_ROUTE]
    wait_until(
        lambda: counter.snapshot()[1][LIST_ROUTE] > listed,
        2 * watch + 30,
        "the next watch poll",
        step=0.01,
    )
    meter = Meter(counter).start()
    time.sleep(polls * watch + watch / 2)
    meter.stop()
    return Steady(
        watch, polls, meter.seconds, meter.routes1 - meter.routes0, default_watch_interval()
    )


def steady_row(metric: str, steady: Steady) -> Row:
    """A requests/min row against issue 17's steady-state target."""
    rate = steady.per_min()
    return Row(SUITE, metric, rate, "req/min", f"<= {TARGET_STEADY_PER_MIN:g}/min",
               rate <= TARGET_STEADY_PER_MIN, steady.detail())  # fmt: skip


def nodes_steady(
    emu: EmulatorProcess, counter: RequestCounter, n: int, watch: float, polls: int
) -> Steady:
    """Steady-state requests of a cluster whose main job has ``n`` nodes (no worker jobs)."""
    kwargs = cluster_kwargs(
        COMPUTE, n_nodes=n, memory_limit=MEMORY_LIMIT, watch_interval=watch, startup_timeout="5m"
    )
    with aml_cluster(emu, emu.ml_client(counter), **kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(n, timeout=60 + 5 * n)
        return measure_steady(counter, watch, polls)


def worker_job_rows(
    emu: EmulatorProcess, counter: RequestCounter, points: list[int], watch: float, polls: int
) -> list[Row]:
    """Steady-state requests with 1 + K one-node jobs, for each K of ``points`` (growing)."""
    rows = []
    kwargs = cluster_kwargs(COMPUTE, n_nodes=1, nodes_per_job=1, memory_limit=MEMORY_LIMIT,
                            watch_interval=watch, startup_timeout="5m")  # fmt: skip
    with aml_cluster(emu, emu.ml_client(counter), **kwargs) as cluster, Client(cluster) as client:
        for k in points:
            scale = Meter(counter).start()
            cluster.scale(nodes=1 + k)
            client.wait_for_workers(1 + k, timeout=60 + 5 * k)

            def all_running(k: int = k) -> bool:
                return sum(s == "Running" for s in cluster.jobs.values()) == 1 + k

            wait_until(all_running, 2 * watch + 60, f"{k} worker jobs running")
            scale.stop()
            steady = measure_steady(counter, watch, polls)
            row = steady_row(f"AML requests/min, steady state, main + {k} worker job(s)", steady)
            row.detail += f"; scaling up to it: {scale.requests} requests in {scale.seconds:.0f}s"
            rows.append(row)
    return rows


# -- the suite -----------------------------------------------------------------


def startup_pairs(
    emu: EmulatorProcess,
    ml_client: Any,
    workdir: Path,
    n: int,
    reps: int,
    warmup: int,
    hold: Hold | None = None,
    hold_seconds: float = 0.0,
) -> tuple[list[Start], list[Start]]:
    """Interleaved starts at ``n`` nodes: (subject, baseline) samples, warm-up dropped.

    With ``hold``, the last subject start also measures the client while the
    cluster runs and closes (after its timed start).
    """
    base: list[Start] = []
    subj: list[Start] = []
    calls = [0]

    def subject() -> float:
        calls[0] += 1
        last = hold is not None and calls[0] == warmup + reps
        return aml_start(emu, ml_client, n, subj, hold if last else None, hold_seconds)

    files = [0]
    interleave(lambda: plain_start(workdir, n, files, base), subject, reps, warmup)
    return subj[warmup:], base[warmup:]


def startup_row(n: int, subj: list[Start], base: list[Start]) -> Row:
    """The start-up ratio at ``n`` nodes (target up to :data:`STARTUP_TARGET_UP_TO` nodes)."""
    ratio = pair_ratio([s.seconds for s in subj], [b.seconds for b in base])
    targeted = n <= STARTUP_TARGET_UP_TO
    phases = " -> ".join(f"{k} {v:.1f}s" for k, v in subj[-1].phases.items())
    return Row(
        SUITE,
        f"start-up, AmlComputeCluster(n_nodes={n}) / dask scheduler + {n} dask workers",
        ratio,
        "x",
        target=f"<= {STARTUP_TARGET}x" if targeted else "",
        met=ratio <= STARTUP_TARGET if targeted else None,
        detail=(
            f"aml {fmt_s([s.seconds for s in subj])}, plain {fmt_s([b.seconds for b in base])}; "
            f"last aml start: {phases}"
        ),
    )


def client_rows(n: int, subj: list[Start], base: list[Start], hold: Hold, rss0: float) -> list:
    """The client process's CPU and RSS for the ``n``-node cluster."""
    plain_cpu = median([b.cpu for b in base])
    cpu_pct = 100 * hold.cpu / hold.seconds if hold.seconds else 0.0
    return [
        Row(
            SUITE,
            f"client CPU to start the {n}-node cluster (to {n} workers)",
            round(median([s.cpu for s in subj]), 2),
            "CPU s",
            detail=(
                f"median of {len(subj)} starts, over {median([s.seconds for s in subj]):.1f}s; "
                f"plain dask client: {plain_cpu:.2f} CPU s"
            ),
        ),
        Row(
            SUITE,
            f"client RSS with the {n}-node cluster running",
            round(median([s.rss for s in subj])),
            "MiB",
            detail=(
                f"after the {n} workers joined (median); {rss0:.0f} MiB before the first "
                f"cluster (SDK imported); {hold.rss:.0f} MiB after {hold.seconds:.0f}s "
                "running (the whole benchmark process: SDK, earlier runs); mlflow imported by "
                f"the client: {'yes' if 'mlflow' in sys.modules else 'no'}"
            ),
        ),
        Row(
            SUITE,
            f"client CPU, steady state, {n}-node cluster (default settings)",
            round(cpu_pct, 2),
            "% of a core",
            detail=f"{hold.cpu:.2f} CPU s over {hold.seconds:.0f}s",
        ),
        Row(
            SUITE,
            f"client CPU to close the {n}-node cluster",
            round(hold.close_cpu, 2),
            "CPU s",
            detail=f"close took {hold.close_seconds:.1f}s",
        ),
    ]


def run(opts: Options) -> SuiteResult:
    """Start-up vs size, steady requests vs nodes and worker jobs, client cost."""
    sizes = opts.pick(NODES, QUICK_NODES)
    reps = opts.pick(3, 2)
    watch, polls = opts.pick((5.0, 4), (2.0, 3))
    hold_seconds = opts.pick(60.0, 15.0)
    result = SuiteResult()
    rows = result.rows
    counter = RequestCounter()
    computes = [{"name": COMPUTE, "max_nodes": MAX_NODES}]
    with EmulatorProcess(opts.workdir, computes, build_environments=False) as emu:
        ml_client = emu.ml_client()
        max_nodes = int(ml_client.compute.get(COMPUTE).max_instances)  # warms the SDK too
        rss0 = client_rss_mib()
        starts: dict[int, tuple[list[Start], list[Start]]] = {}
        request_rows = []
        hold = Hold()
        for i, n in enumerate(sizes):
            steady = nodes_steady(emu, counter, n, watch, polls)  # also warms this size up
            request_rows.append(steady_row(f"AML requests/min, steady state, {n}-node main job",
                                           steady))  # fmt: skip
            starts[n] = startup_pairs(
                emu, ml_client, opts.workdir, n, reps, warmup=1 if i == 0 else 0,
                hold=hold if n == sizes[-1] else None, hold_seconds=hold_seconds,
            )  # fmt: skip
            rows.append(startup_row(n, *starts[n]))
        rows.extend(request_rows)
        fit = max_nodes - 1  # the main job holds one node
        wanted = list(opts.pick(WORKER_JOBS, QUICK_WORKER_JOBS))
        points = sorted({min(k, fit) for k in wanted})
        rows.extend(worker_job_rows(emu, counter, points, watch, polls))
        n_max = sizes[-1]
        rows.extend(client_rows(n_max, *starts[n_max], hold, rss0))
    result.notes.append(
        f"scale: nodes are real processes running the node entry point on this machine "
        f"({os.cpu_count()} cores), one worker thread and {MEMORY_LIMIT} each; every start on "
        "both sides competes for the same cores, so start-up grows with N on both sides. The "
        f"request curves use watch_interval={watch:g}s and windows of {polls} polls, scaled to "
        f"the default {default_watch_interval():g}s (module docstring). The emulator pages job "
        "lists as AML does (100 jobs a page); the watch lists only the cluster's own jobs."
    )
    if max_nodes - 1 < max(opts.pick(WORKER_JOBS, QUICK_WORKER_JOBS)):
        result.notes.append(f"scale: compute {COMPUTE} fits only {max_nodes - 1} worker jobs.")
    return result
