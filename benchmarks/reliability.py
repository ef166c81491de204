"""Reliability report: create / compute / close cycles with random fault injection.

Each cycle starts an ``AmlComputeCluster`` on the emulator (main job of 1 node
plus a worker job), injects one random fault, runs a computation whose result
is known, checks it, closes the cluster and checks that no job is left running.
Faults: control-plane errors (429/500/503 for several requests, during start
or while scaling), a worker node killed mid-computation, a preempted worker
node, or none. Prints: cycles, faults injected, results wrong (must be 0),
cycles that raised (with the typed error), jobs left running (must be 0).

Usage: ``python benchmarks/reliability.py [--cycles N] [--seed S] [--no-record]``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
FAULTS = ("none", "http-429-start", "http-5xx-scale", "kill-worker-node", "preempt-worker-node")


def _square_slowly(x: int) -> int:
    time.sleep(0.05)
    return x * x


def run_cycle(emu, fault: str, index: int) -> str:
    """One cycle; returns "ok", "wrong" or the name of the exception raised."""
    from distributed import Client

    from dask_amlcompute import AmlComputeCluster

    kwargs = {
        "compute": "rel",
        "n_nodes": 1,
        "threads_per_process": 1,
        "poll_interval": 0.2,
        "watch_interval": 1,
        "startup_timeout": "120s",
        "death_timeout": "60s",
        "quiet": True,
        "name": f"rel-{index}-{int(time.time())}",
    }
    if fault == "http-429-start":
        emu.inject_http_errors(4, status=429, retry_after=1)
    try:
        with AmlComputeCluster(emu.ml_client(), **kwargs) as cluster, Client(cluster) as client:
            if fault == "http-5xx-scale":
                emu.inject_http_errors(4, status=random.choice([500, 503]))
            cluster.scale(2)
            client.wait_for_workers(2, timeout=120)
            futures = client.map(_square_slowly, range(200), retries=3)
            if fault in ("kill-worker-node", "preempt-worker-node"):
                time.sleep(0.5)
                worker_jobs = [j for j in cluster.jobs if j != cluster.main_job_name]
                if fault == "kill-worker-node":
                    emu.fail_node(worker_jobs[0], 0)
                else:
                    emu.preempt_node(worker_jobs[0], 0)
            got = client.gather(futures, errors="raise")
            return "ok" if got == [x * x for x in range(200)] else "wrong"
    except Exception as exc:  # a clear, typed error is acceptable; a wrong result is not
        return type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the cycles, print the report, append it to RESULTS.md; exit 1 on wrong/leftover."""
    from aml_emulator import ComputeSpec, Emulator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    outcomes: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    left_running = 0
    start = time.monotonic()
    with Emulator(computes=[ComputeSpec(name="rel", max_nodes=4)]) as emu:
        for i in range(args.cycles):
            fault = random.choice(FAULTS)
            faults[fault] += 1
            outcome = run_cycle(emu, fault, i)
            outcomes[outcome] += 1
            deadline = time.monotonic() + 30
            while emu.active_jobs() and time.monotonic() < deadline:
                time.sleep(0.2)
            leftover = emu.active_jobs()
            left_running += len(leftover)
            print(
                f"cycle {i + 1}/{args.cycles}: fault={fault:20} outcome={outcome} left={leftover}"
            )
    wrong = outcomes.get("wrong", 0)
    raised = {k: v for k, v in outcomes.items() if k not in ("ok", "wrong")}
    lines = [
        f"cycles: {args.cycles}",
        f"faults injected: {sum(v for k, v in faults.items() if k != 'none')} "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(faults.items()))})",
        f"results correct: {outcomes.get('ok', 0)}",
        f"results wrong: {wrong} (must be 0)",
        f"cycles that raised a typed error: {sum(raised.values())} {raised or ''}",
        f"jobs left running: {left_running} (must be 0)",
        f"time: {time.monotonic() - start:.0f}s",
    ]
    print("\n".join(lines))
    if not args.no_record:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python benchmarks/reliability.py " + " ".join(argv or sys.argv[1:])
        with RESULTS.open("a") as f:
            f.write(f"\n## {stamp} (reliability)\n\nCommand: `{cmd.strip()}`\n\n")
            f.write("".join(f"- {line}\n" for line in lines))
    return 1 if wrong or left_running else 0


if __name__ == "__main__":
    sys.exit(main())
