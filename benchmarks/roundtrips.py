"""Issue 28 (2): sequential control-plane round trips on a cluster's critical paths.

The emulator (its own process, nodes on its interpreter: ``build_environments=False``)
delays every control-plane and run-history request by ``request_latency`` L, as a
round trip to Azure does (100-300 ms from a laptop), and logs each request's
start and end. For L = 0 and 0.15 s, a 2-node ``AmlComputeCluster`` is started,
reconnected with ``from_name``, scaled by one worker job and closed; for each
step the suite reports its time and the number of *sequential* round trips in
its window: the largest set of logged requests no two of which overlap (the
round trips whose latencies add up; concurrent ones count once). Windows:

- pre-submit: from the constructor call to the start of the main job's PUT, for a
  first start on the emulator (a 1-node cluster: the code snapshot is uploaded) and
  the measured second one (the snapshot is found by its hash, as on a user's
  second run; the target applies to it);
- after Running: from the main job turning Running to the constructor returning
  (scheduler connected), the node's own run-history writes included;
- ``from_name``, ``scale(+1)`` (to the end of the worker job's PUT) and ``close``:
  the call itself.

Start-up time is the constructor to a ``Client`` with both workers; with L = 0
it is the baseline of the L = 0.15 s row (ratio, same run).
"""

from __future__ import annotations

import time
from typing import Any

import requests
from common import EmulatorProcess, Options, Row, SuiteResult, cluster_kwargs, wait_until
from distributed import Client

COMPUTE = "bench-rt"
LATENCIES = (0.0, 0.15)
#: Issue 28: at most this many sequential round trips before the main job's PUT, within
#: this many seconds, at the latency where concurrent requests overlap (0.15 s).
MAX_PRE_SUBMIT, MAX_PRE_SUBMIT_SECONDS = 3, 1.0


def sequential(log: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The largest chain of non-overlapping requests inside ``[start, end]`` (greedy by end)."""
    chain: list[dict[str, Any]] = []
    for req in sorted(
        (r for r in log if r["start"] >= start and r["end"] <= end), key=lambda r: r["end"]
    ):
        if not chain or req["start"] >= chain[-1]["end"]:
            chain.append(req)
    return chain


def describe(chain: list[dict[str, Any]]) -> str:
    """``GET computes -> PUT jobs ...``: the chain's routes, shortened."""

    def short(r: dict[str, Any]) -> str:
        parts = [p for p in r["path"].split("/") if p]
        tail = "/".join(parts[-2:]) if len(parts) > 1 else r["path"]
        return f"{r['method']} {tail}"

    return " -> ".join(short(r) for r in chain) or "none"


class Step:
    """A timed window of the request log."""

    def __init__(self) -> None:
        self.start = time.time()
        self.end = 0.0

    def stop(self) -> Step:
        self.end = time.time()
        return self

    @property
    def seconds(self) -> float:
        return self.end - self.start


def measure(opts: Options, latency: float) -> dict[str, tuple[float, list[dict[str, Any]]]]:
    """One start / from_name / scale(+1) / close at ``latency``: step -> (seconds, chain)."""
    from dask_amlcompute import AmlComputeCluster

    out: dict[str, tuple[float, list[dict[str, Any]]]] = {}
    computes = [{"name": COMPUTE, "max_nodes": 8}]
    with EmulatorProcess(
        opts.workdir, computes, build_environments=False, request_latency=latency
    ) as emu:
        ml_client = emu.ml_client()
        ml_client.compute.get(COMPUTE)  # SDK imports and first connection, as in a notebook

        def log() -> list[dict[str, Any]]:
            return requests.get(f"{emu.base_url}/emulator/requests", timeout=30).json()

        kwargs = cluster_kwargs(COMPUTE, n_nodes=2, nodes_per_job=1)
        first = Step()  # a first start uploads the code snapshot; the second finds it by hash
        with AmlComputeCluster(ml_client, **{**kwargs, "n_nodes": 1}) as warm:
            put = next(
                r for r in log() if r["method"] == "PUT" and r["path"].endswith(warm.main_job_name)
            )
        out["pre-submit, first start (code snapshot uploaded)"] = (
            put["start"] - first.start,
            sequential(log(), first.start, put["start"]),
        )
        wait_until(lambda: not emu.active_jobs(warm.name), 60, "the first cluster's jobs to end")
        start = Step()
        cluster = AmlComputeCluster(ml_client, **kwargs)
        try:
            connected_at = time.time()
            with Client(cluster, timeout=60) as client:
                client.wait_for_workers(2, timeout=60)
                start.stop()
                main = cluster.main_job_name
                put = next(r for r in log() if r["method"] == "PUT" and r["path"].endswith(main))
                out["pre-submit, second start (constructor to main job PUT)"] = (
                    put["start"] - start.start,
                    sequential(log(), start.start, put["start"]),
                )
                running = next(
                    t for t, s in emu.status()["jobs"][main]["status_log"] if s == "Running"
                )
                out["after Running (to scheduler connected)"] = (
                    connected_at - running,
                    sequential(log(), running, connected_at),
                )
                out["start-up (constructor to client + 2 workers)"] = (
                    start.seconds,
                    sequential(log(), start.start, start.end),
                )
                step = Step()
                other = AmlComputeCluster.from_name(cluster.name, ml_client, quiet=True)
                step.stop()
                out["from_name"] = (step.seconds, sequential(log(), step.start, step.end))
                other.close()
                step = Step()
                cluster.scale(3)
                wait_until(
                    lambda: any(
                        r["method"] == "PUT"
                        and f"/jobs/{cluster.name}-w" in r["path"]
                        and r["start"] >= step.start
                        for r in log()
                    ),
                    60,
                    "the worker job's PUT",
                )
                step.stop()
                client.wait_for_workers(3, timeout=60)
                out["scale(+1) (to the worker job's PUT)"] = (
                    step.seconds,
                    sequential(log(), step.start, step.end),
                )
        finally:
            step = Step()
            cluster.close()
            step.stop()
        out["close"] = (step.seconds, sequential(log(), step.start, step.end))
        wait_until(lambda: not emu.active_jobs(cluster.name), 60, "the cluster's jobs to end")
    return out


def run(opts: Options) -> SuiteResult:
    """Each step at request latency 0 and 0.15 s: time and sequential round trips."""
    result = SuiteResult()
    runs = {latency: measure(opts, latency) for latency in LATENCIES}
    for step in runs[LATENCIES[0]]:
        for latency in LATENCIES:
            seconds, chain = runs[latency][step]
            pre = step.startswith("pre-submit, second") and latency > 0
            result.rows.append(
                Row(
                    "roundtrips",
                    f"{step}, latency {latency:g}s: sequential round trips",
                    len(chain),
                    "req",
                    target=f"<= {MAX_PRE_SUBMIT}, < {MAX_PRE_SUBMIT_SECONDS:g}s" if pre else "",
                    met=len(chain) <= MAX_PRE_SUBMIT and seconds < MAX_PRE_SUBMIT_SECONDS
                    if pre
                    else None,
                    detail=f"{seconds:.2f}s; {describe(chain)}",
                )
            )
    base, slow = (runs[lat]["start-up (constructor to client + 2 workers)"][0] for lat in LATENCIES)
    result.rows.append(
        Row(
            "roundtrips",
            f"start-up at latency {LATENCIES[1]:g}s / at 0",
            slow / base,
            "x",
            detail=f"{slow:.2f}s vs {base:.2f}s",
        )
    )
    result.notes.append(
        "roundtrips: a sequential round trip is a request that started after the previous one "
        "in the chain ended (the emulator's request log); concurrent requests count once. At "
        "latency 0 concurrent requests end (~1 ms) before the next one starts and count "
        "apart: the count is an upper bound there, and the target applies at 0.15 s. "
        "Node allocation, image pull and AML's Queued/Preparing states are not included."
    )
    return result
