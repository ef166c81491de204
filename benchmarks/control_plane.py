"""Issues 3 (c) and 5: AML API requests a cluster makes, at start, idle, scaled, at close.

Requests are counted twice: by ``AmlOps.calls`` (the library's own count of
SDK operations) and by an azure-core per-call policy on the ``MLClient`` (every
HTTP request the SDK sends: one operation may be several requests, e.g. a
cancel and its long-running-operation polls). The emulator has no request
counter of its own. ``watch_interval`` stays at its default (30 s).

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
)
from distributed import Client

COMPUTE = "bench-cp"
TARGET_PER_MIN = 12.0


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


def rate_row(metric: str, meter: Meter) -> Row:
    """A row with the request rate of ``meter``, against the per-cluster target."""
    rate = meter.per_min()
    target = f"<= {TARGET_PER_MIN:g}/min"
    return Row("control_plane", metric, rate, "req/min", target, rate <= TARGET_PER_MIN,
               meter.detail())  # fmt: skip


def run(opts: Options) -> SuiteResult:
    """Count AML requests through a cluster's life."""
    window = opts.pick(61.0, 31.0)
    result = SuiteResult()
    rows = result.rows
    counter = RequestCounter()
    with EmulatorProcess(opts.workdir, [{"name": COMPUTE, "max_nodes": 3}]) as emu:
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
    result.notes.append(
        "control_plane: steady-state polling is one GET job per job of the cluster per "
        "watch_interval (30 s): 2/min per job, so the <= 12/min target holds up to 6 jobs "
        "(main + 5 worker jobs); more worker jobs (nodes_per_job=1, large adapt maximum) "
        "exceed it linearly."
    )
    return result
