"""Issues 3 (c), 5 and 17: AML API requests a cluster makes, at start, idle, scaled, at close.

Requests are counted by an azure-core per-call policy on the ``MLClient``
(every HTTP request the SDK sends: one operation may be several requests, e.g.
a cancel and its long-running-operation polls, or a job list and its pages).
``watch_interval`` stays at its default (30 s).

Log tails (read only when a job fails, and by ``get_logs()``) are plain HTTP
reads of the job's log URLs, outside the AML control plane; neither count
includes them.
"""

from __future__ import annotations

import time

from common import (
    EmulatorProcess,
    Options,
    RequestCounter,
    Row,
    SuiteResult,
    aml_cluster,
    cluster_kwargs,
    route_summary,
    wait_until,
)
from distributed import Client

COMPUTE = "bench-cp"
TARGET_PER_MIN = 12.0
#: Issue 17: the steady-state rate of a cluster, whatever its number of worker jobs.
TARGET_STEADY_PER_MIN = 4.0
#: The compute of the "main + N worker jobs" rows: one node per worker job.
MANY_COMPUTE = "bench-cp-many"
#: The large N of those rows: as many one-node worker jobs as a 2-core machine runs.
MANY_WORKER_JOBS = 16


class Meter:
    """Requests counted by the client's pipeline policy between ``start()`` and ``stop()``."""

    def __init__(self, counter: RequestCounter) -> None:
        self.counter = counter

    def start(self) -> Meter:
        """Take the first snapshot."""
        self.t0 = time.perf_counter()
        self.n0, self.routes0 = self.counter.snapshot()
        return self

    def stop(self) -> Meter:
        """Take the second snapshot."""
        self.seconds = time.perf_counter() - self.t0
        self.n1, self.routes1 = self.counter.snapshot()
        self.requests = self.n1 - self.n0
        return self

    def per_min(self) -> float:
        """Requests per minute over the window."""
        return round(self.requests * 60 / self.seconds, 1)

    def detail(self) -> str:
        """The routes, for the detail column."""
        return (
            f"{self.requests} requests in {self.seconds:.0f}s: "
            f"{route_summary(self.routes0, self.routes1)}"
        )


def count_row(metric: str, meter: Meter) -> Row:
    """A row with the number of requests of ``meter``."""
    return Row("control_plane", metric, meter.requests, "req", detail=meter.detail())


def rate_row(metric: str, meter: Meter, target_per_min: float = TARGET_PER_MIN) -> Row:
    """A row with the request rate of ``meter``, against ``target_per_min``."""
    rate = meter.per_min()
    target = f"<= {target_per_min:g}/min"
    return Row("control_plane", metric, rate, "req/min", target, rate <= target_per_min,
               meter.detail())  # fmt: skip


def steady_rows(
    emu: EmulatorProcess, counter: RequestCounter, window: float, many: int
) -> list[Row]:
    """Steady-state request rates of one cluster with 1, then ``many`` worker jobs.

    One-node worker jobs with one small worker each, so that many fit on this
    machine (at most :data:`MANY_WORKER_JOBS`); ``watch_interval`` stays at its default.
    """
    rows = []
    kwargs = cluster_kwargs(MANY_COMPUTE, n_nodes=1, nodes_per_job=1, memory_limit="256MiB")
    rates = {}
    with (
        aml_cluster(emu, emu.ml_client(counter), **kwargs) as cluster,
        Client(cluster) as client,
    ):
        for n in (1, many):
            cluster.scale(nodes=1 + n)
            client.wait_for_workers(1 + n, timeout=60 + 20 * n)
            wait_until(
                lambda n=n: sum(s == "Running" for s in cluster.jobs.values()) == 1 + n,
                60,
                f"{n} worker jobs running",
            )
            meter = Meter(counter).start()
            time.sleep(window)
            meter.stop()
            rates[n] = meter.per_min()
            rows.append(
                rate_row(
                    f"AML requests/min, steady state, main + {n} worker jobs",
                    meter,
                    TARGET_STEADY_PER_MIN,
                )
            )
    slope = (rates[many] - rates[1]) / (many - 1)
    rows.append(
        Row(
            "control_plane",
            "AML requests/min per extra worker job (steady-state slope)",
            round(slope, 2),
            "req/min",
            "~0",
            abs(slope) < 0.1,
            f"({rates[many]} - {rates[1]}) req/min / {many - 1} worker jobs",
        )
    )
    return rows


def run(opts: Options) -> SuiteResult:
    """Count AML requests through a cluster's life."""
    window = opts.pick(61.0, 31.0)
    result = SuiteResult()
    rows = result.rows
    counter = RequestCounter()
    computes = [
        {"name": COMPUTE, "max_nodes": 3},
        {"name": MANY_COMPUTE, "max_nodes": 1 + MANY_WORKER_JOBS},
    ]
    with EmulatorProcess(opts.workdir, computes) as emu:
        ml_client = emu.ml_client(counter)
        ml_client.compute.get(COMPUTE)  # warm the SDK; not counted below
        start = Meter(counter).start()
        with (
            aml_cluster(emu, ml_client, **cluster_kwargs(COMPUTE, n_nodes=1)) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(1, timeout=60)
            start.stop()
            rows.append(count_row("AML requests to start (n_nodes=1) and connect", start))
            if not opts.quick:
                idle = Meter(counter).start()
                time.sleep(window)
                rows.append(rate_row("AML requests/min, idle, main job only", idle.stop()))
            scale = Meter(counter).start()
            cluster.scale(nodes=3)
            client.wait_for_workers(3, timeout=120)
            rows.append(count_row("AML requests to scale 1 -> 3 nodes (2 worker jobs)",
                                  scale.stop()))  # fmt: skip
            steady = Meter(counter).start()
            time.sleep(window)
            rows.append(rate_row("AML requests/min, steady state, main + 2 worker jobs",
                                 steady.stop()))  # fmt: skip
            close = Meter(counter).start()
        rows.append(count_row("AML requests to close (3 jobs)", close.stop()))
        rows.extend(steady_rows(emu, counter, window, opts.pick(MANY_WORKER_JOBS, 4)))
    result.notes.append(
        "control_plane: a running cluster watches all of its jobs with one job list "
        "(GET /jobs?listViewType=ActiveOnly&tag=dask_cluster.<name>) per watch_interval "
        "(30 s): about 2 requests/min whatever its number of worker jobs; a GET of one job "
        "only for a watched job missing from the list. The 'main + N worker jobs' rows use "
        "one-node worker jobs (nodes_per_job=1) on their own cluster."
    )
    return result
