"""Issue 28 (1, 3): start-up and close vs cluster size, emulator default mode and fast mode.

Subject: ``AmlComputeCluster(n_nodes=N, threads_per_process=1, memory_limit="300MiB")``
from its constructor to a ``Client`` seeing N workers, then ``cluster.close()``.
Baseline, same run: ``dask scheduler`` + N ``dask worker --nthreads 1
--memory-limit 300MiB`` launched at once, to a ``Client`` seeing N workers, then
``client.shutdown()`` until every process exited. The baseline runs the interpreter the
nodes run (default mode: the built virtualenv, with bokeh, so both schedulers serve
a dashboard, and its workers get ``--no-dashboard`` as the cluster's workers have none). They alternate (B S / S B); the median
of the per-pair ratios is reported with the raw times.

Two emulator modes, each in its own emulator process with provisioning delay 0:

- **default**: as a user meets it. Each node runs in the virtualenv built for the
  job's environment (the library's default, ``stack="sync"``), already cached as on
  a user's second run: one warm-up cluster builds or finds it before timing.
- **fast** (``build_environments=False``): nodes import from the client's own
  interpreter, as the ``scale`` suite runs them.

Per-phase times of the default mode come from the cluster's ``startup_phases``
(seconds since the submission began: submitted, Running, scheduler address,
connected, workers joined); "pre-submit" is the constructor's checks before it,
the constructor's time minus its ``connected`` phase.

Large sizes are bounded on a 2-core machine (:data:`PAIRS`): every node is real
processes (a nanny and its worker) competing for the same cores on both sides. So each
row also gives the CPU seconds both sides spent from start to ready (this process, the
emulator and every node or Dask process, exited ones included): near 2 s per second of
start-up, a side is bound by the cores, and the CPU difference is what it costs more.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    EmulatorProcess,
    Options,
    Row,
    SuiteResult,
    aml_cluster,
    cluster_kwargs,
    interleave,
    median,
    pair_ratio,
    plain_dask_start,
    tree_cpu_seconds,
)
from distributed import Client

COMPUTE = "bench-size"
MEMORY_LIMIT = "300MiB"
#: Sizes, and measured pairs per size (bounded at 16 and 32 nodes on 2 cores).
PAIRS = {2: 3, 4: 3, 8: 2, 16: 1, 32: 1}
QUICK_PAIRS = {2: 1, 4: 1}
#: Issue 28: the default mode within this ratio of plain Dask at every size.
TARGET = 1.1
#: Sizes with a close row (issue 28 item 3).
CLOSE_SIZES = (2, 8, 32)
MODES = {"default": {}, "fast": {"build_environments": False}}


@dataclass
class Sample:
    """One timed start and close (``phases``: the subject's ``startup_phases``)."""

    start: float
    close: float
    phases: dict[str, float] = field(default_factory=dict)
    job: str = ""
    cpu: float = 0.0  # CPU seconds of every process involved, from start to ready


def plain(opts: Options, n: int, files: list[int], out: list[Sample], python: Any = None) -> float:
    """The plain-Dask baseline (in ``python``'s environment, see common); times to ``out``."""
    closed: list[float] = []
    cpu = [-tree_cpu_seconds()]
    seconds = plain_dask_start(opts.workdir, n, files, MEMORY_LIMIT, closed=closed, python=python,
                               on_ready=lambda *_: cpu.append(tree_cpu_seconds()))  # fmt: skip
    out.append(Sample(seconds, closed[0], cpu=sum(cpu)))
    return seconds


def aml(emu: EmulatorProcess, ml_client: Any, n: int, out: list[Sample]) -> float:
    """Constructor to a client with ``n`` workers, then ``close()``; both to ``out``."""
    kwargs = cluster_kwargs(COMPUTE, n_nodes=n, memory_limit=MEMORY_LIMIT, startup_timeout="5m")
    cpu, start = tree_cpu_seconds(), time.perf_counter()
    with aml_cluster(emu, ml_client, **kwargs) as cluster:
        built = time.perf_counter() - start
        with Client(cluster, timeout=60) as client:
            client.wait_for_workers(n, timeout=60 + 5 * n)
            seconds = time.perf_counter() - start
            cpu = tree_cpu_seconds() - cpu
        phases = cluster.startup_phases  # the constructor returns once the workers joined
        phases = {"pre-submit": round(built - max(phases.values(), default=0.0), 3), **phases}
        t0 = time.perf_counter()
        cluster.close()
        out.append(Sample(seconds, time.perf_counter() - t0, phases, cluster.main_job_name, cpu))
    return seconds


def node_python(ml_client: Any, job: str) -> tuple[str, dict[str, str]] | None:
    """The built virtualenv's ``bin`` the nodes of ``job`` ran, and their environment.

    None when they ran this interpreter (fast mode). The emulator names the
    interpreter in the job's ``emulator.environment`` property.
    """
    from aml_emulator.nodes import node_base_environment

    report = ml_client.jobs.get(job).properties.get("emulator.environment", "")
    match = re.search(r"nodes run (\S+)/python \(built\)", report)
    if match is None:
        return None
    return match.group(1), node_base_environment({}, venv=str(Path(match.group(1)).parent))


def raw(samples: list[Sample], attr: str) -> str:
    """``1.23/1.30/1.41s``: every sample's ``attr``."""
    return "/".join(f"{getattr(s, attr):.2f}" for s in samples) + "s"


def phases_text(samples: list[Sample]) -> str:
    """Median seconds since submission of each startup phase over ``samples``."""
    names = [k for k in samples[-1].phases if all(k in s.phases for s in samples)]
    return ", ".join(f"{k} {median([s.phases[k] for s in samples]):.2f}" for k in names)


def mode_rows(mode: str, n: int, subj: list[Sample], base: list[Sample]) -> list[Row]:
    """The start-up row at ``n`` nodes, and (default mode) the close row."""
    ratio = pair_ratio([s.start for s in subj], [b.start for b in base])
    default = mode == "default"
    rows = [
        Row(
            "startsize",
            f"start-up, {mode} mode, AmlComputeCluster(n_nodes={n}) / dask scheduler + {n} "
            "dask workers",
            ratio,
            "x",
            target=f"<= {TARGET}x" if default else "",
            met=ratio <= TARGET if default else None,
            detail=f"{len(subj)} pair(s): aml {raw(subj, 'start')}, plain {raw(base, 'start')}; "
            f"phases (s since submit, median): {phases_text(subj)}; CPU s of all processes "
            f"to ready (median): aml {median([s.cpu for s in subj]):.1f}, "
            f"plain {median([b.cpu for b in base]):.1f}",
        )
    ]
    if default and n in CLOSE_SIZES:
        rows.append(
            Row(
                "startsize",
                f"close, {mode} mode, AmlComputeCluster(n_nodes={n}).close() / stopping "
                f"dask scheduler + {n} dask workers",
                pair_ratio([s.close for s in subj], [b.close for b in base]),
                "x",
                detail=f"aml close {raw(subj, 'close')}, plain stop {raw(base, 'close')}",
            )
        )
    return rows


def measure_mode(opts: Options, mode: str, pairs: dict[int, int]) -> list[Row]:
    """Every size in one emulator of ``mode``, after a discarded warm-up pair."""
    rows: list[Row] = []
    computes = [{"name": COMPUTE, "max_nodes": max(pairs) + 1}]
    with EmulatorProcess(opts.workdir, computes, **MODES[mode]) as emu:
        ml_client = emu.ml_client()
        ml_client.compute.get(COMPUTE)  # SDK imports and first connection, as in a notebook
        files, warm = [0], []
        aml(emu, ml_client, min(pairs), warm)  # the code snapshot uploaded, the environment built
        python = node_python(ml_client, warm[0].job)
        plain(opts, min(pairs), files, [], python)  # its interpreter's first start
        for n, reps in pairs.items():
            base: list[Sample] = []
            subj: list[Sample] = []
            interleave(lambda n=n, b=base: plain(opts, n, files, b, python),
                       lambda n=n, s=subj: aml(emu, ml_client, n, s), reps=reps, warmup=0)  # fmt: skip
            for row in mode_rows(mode, n, subj, base):
                rows.append(row)
                print(f"  {row.metric}: {row.formatted()} {row.detail}", flush=True)
    return rows


def run(opts: Options) -> SuiteResult:
    """Start-up (and close) vs size, default mode then fast mode."""
    pairs = opts.pick(PAIRS, QUICK_PAIRS)
    if opts.sizes:
        pairs = {n: PAIRS.get(n, 1) for n in opts.sizes}
    if opts.pairs:
        pairs = dict.fromkeys(pairs, opts.pairs)
    result = SuiteResult()
    for mode in MODES:
        result.rows.extend(measure_mode(opts, mode, pairs))
    bounded = ", ".join(f"{n}: {r}" for n, r in pairs.items())
    result.notes.append(
        f"startsize: measured pairs per size ({bounded}); every node is a nanny and a worker "
        "process on this machine on both sides, so at 16-32 nodes both sides mostly measure "
        "the cores. Close: AmlComputeCluster.close() returning (every job cancelled or "
        "completed) vs client.shutdown() until every plain process exited."
    )
    return result
