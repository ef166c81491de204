"""Issue 15: what the strict emulator's environment build adds to a cluster's start.

Subject: ``AmlComputeCluster(n_nodes=2)`` with the default node environment on an
emulator whose environment cache is empty, so the job stays in ``Preparing``
while the emulator builds the isolated virtualenv from the package index
(first start); then the same cluster again with the build cached (cached
start). Baseline, same run: the cached start. Measured twice: with the
installer's download cache warm (what a second project on the same machine
sees) and cold (a fresh ``UV_CACHE_DIR``: every wheel is downloaded), for the
default ``stack="sync"`` (every package of this client, issue 27) and for
``stack="installed"`` (dask and the data stack only, the default before).

On real AML the first build of an environment is a Docker image build, 5-20
minutes; these figures are the emulator's, not AML's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from common import (
    EmulatorProcess,
    Options,
    Row,
    SuiteResult,
    aml_cluster,
    cluster_kwargs,
    fmt_s,
    median,
)
from distributed import Client

COMPUTE = "bench-cpu"


def cluster_start(emu: EmulatorProcess, ml_client, stack: str) -> tuple[float, float]:
    """Seconds to a client with the cluster's workers, and seconds spent in Preparing."""
    start = time.perf_counter()
    with (
        aml_cluster(emu, ml_client, **cluster_kwargs(COMPUTE, n_nodes=2, stack=stack)) as cluster,
        Client(cluster, timeout=60) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        elapsed = time.perf_counter() - start
        phases = cluster.startup_phases
    preparing = phases.get("Running", 0.0) - phases.get("Preparing", phases.get("Running", 0.0))
    return elapsed, preparing


def build_facts(cache: Path) -> str:
    """Requirements and packages resolved of the environment built in ``cache`` (the uv log)."""
    for log in cache.glob("*/build.log"):
        reqs = len((log.parent / "requirements.txt").read_text().split())
        resolved = re.search(r"Resolved (\d+) packages", log.read_text())
        return f"{reqs} requirements, {resolved.group(1) if resolved else '?'} packages resolved"
    return "no build found"


def measure(
    opts: Options, stack: str, cold_downloads: bool, reps: int
) -> tuple[float, float, list[float], str]:
    """First start (build), its Preparing time, cached starts and the build's size, on a fresh
    environment cache."""
    cache = opts.workdir / f"envs-{stack}-{'cold' if cold_downloads else 'warm'}"
    uv_cache = opts.workdir / f"uv-cache-cold-{stack}"
    env = {"UV_CACHE_DIR": str(uv_cache)} if cold_downloads else None
    with EmulatorProcess(
        opts.workdir,
        [{"name": COMPUTE, "max_nodes": 4}],
        env=env,
        environment_cache=str(cache),
    ) as emu:
        ml_client = emu.ml_client()
        ml_client.compute.get(COMPUTE)  # SDK imports and first connection, as in a notebook
        first, preparing = cluster_start(emu, ml_client, stack)
        cached = [cluster_start(emu, ml_client, stack)[0] for _ in range(reps)]
    return first, preparing, cached, build_facts(cache)


def run(opts: Options) -> SuiteResult:
    """First start with an environment build vs. cached start, warm and cold downloads."""
    reps = opts.pick(3, 1)
    result = SuiteResult()
    for stack, cold in (("installed", False), ("installed", True), ("sync", False), ("sync", True)):
        first, preparing, cached, facts = measure(opts, stack, cold, reps)
        what = "cold download cache (every wheel fetched)" if cold else "warm download cache"
        result.rows.append(
            Row(
                "envbuild",
                f"first start of a new stack={stack} environment, {what}, / cached start",
                first / median(cached),
                "x",
                detail=(
                    f"first start {first:.1f}s of which {preparing:.1f}s Preparing (the build); "
                    f"cached start {fmt_s(cached)}; {facts}; n_nodes=2"
                ),
            )
        )
    result.notes.append(
        "envbuild: the emulator builds one virtualenv per environment content hash with uv "
        "(bytecode compiled, as pip and AML's image build do) and caches it on disk; the job "
        "stays in Preparing meanwhile, which prepare_timeout bounds and startup_timeout does "
        "not count. On AML the first image build of an environment takes 5-20 minutes."
    )
    return result
