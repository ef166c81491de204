"""Issue 5: adaptive scale-up under a backlog and release of idle nodes.

The emulator's provisioning delay ``D`` (seconds each job spends in
``Preparing``) stands for AML's node allocation. A 1-node cluster adapts
between 1 and 3 nodes with a short policy (decisions every 1 s, 3 idle
decisions before release) so that the library's own latency is visible; the
defaults (every 10 s, 12 decisions) add up to 10 s before growing and 2
minutes before releasing, on purpose.

Baseline, same run, alternating with each adapt cycle: a plain ``dask
worker`` process started by hand on the client machine, dialing the same
scheduler, timed until the scheduler has it. That is the part of a node's
start that no library can remove once AML has provisioned the node.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import (
    DASK_CLI,
    EmulatorProcess,
    Options,
    RequestCounter,
    Row,
    SuiteResult,
    aml_cluster,
    cluster_kwargs,
    median,
    shippable,
    spawn,
    stop_process,
    wait_until,
)
from distributed import Client

COMPUTE = "bench-scale"
INTERVAL, WAIT_COUNT = 1.0, 3


def _n_workers(dask_scheduler) -> int:
    return len(dask_scheduler.workers)


def _slow(x: int) -> int:
    time.sleep(0.5)
    return x


n_workers_fn = shippable(_n_workers)
slow = shippable(_slow)


def n_workers(client: Client) -> int:
    """Workers the scheduler has right now (not the client's cached view)."""
    return client.run_on_scheduler(n_workers_fn)


def plain_worker_join(client: Client, address: str, workdir: Path, i: int) -> float:
    """Seconds for a hand-started ``dask worker`` to join; it is retired afterwards."""
    before = n_workers(client)
    name = f"plain-{i}"
    start = time.perf_counter()
    proc = spawn(
        [DASK_CLI, "worker", address, "--nthreads", "1", "--name", name, "--host", "127.0.0.1",
         "--death-timeout", "60", "--no-dashboard"],
        workdir / "plain-worker.log",
    )  # fmt: skip
    try:
        wait_until(lambda: n_workers(client) > before, 60, "the plain worker")
        elapsed = time.perf_counter() - start
        client.retire_workers(names=[name], close_workers=True)
    finally:
        stop_process(proc)
    wait_until(lambda: n_workers(client) == before, 60, "the plain worker to leave")
    return elapsed


def adapt_cycle(cluster, client: Client, emu: EmulatorProcess, counter, tasks: int) -> dict:
    """One backlog -> grow -> idle -> release cycle; returns its timings and request count."""
    adaptive = cluster.adapt(
        minimum=1, maximum=3, interval=f"{INTERVAL}s", wait_count=WAIT_COUNT, target_duration="5s"
    )
    try:
        requests0 = counter.snapshot()[0]
        start = time.perf_counter()
        futures = client.map(slow, range(tasks), pure=False)
        wait_until(lambda: n_workers(client) >= 2, 120, "a new worker under backlog")
        first = time.perf_counter() - start
        wait_until(lambda: n_workers(client) >= 3, 120, "all new workers under backlog")
        every = time.perf_counter() - start
        client.gather(futures)
        del futures
        idle = time.perf_counter()
        wait_until(lambda: emu.in_use(COMPUTE) == 1, 180, "idle nodes to be released")
        released = time.perf_counter() - idle
        seconds = time.perf_counter() - start
        requests = counter.snapshot()[0] - requests0
    finally:
        adaptive.stop()
    wait_until(lambda: n_workers(client) == 1, 60, "the cluster back at its main job")
    return {"first": first, "all": every, "released": released,
            "rate": requests * 60 / seconds, "requests": requests}  # fmt: skip


def run(opts: Options) -> SuiteResult:
    """Measure adaptive scale-up and release against the provisioning delay."""
    delay = opts.pick(5.0, 3.0)
    reps = opts.pick(2, 1)
    tasks = opts.pick(60, 40)
    counter = RequestCounter()
    cycles, plain = [], []
    computes = [{"name": COMPUTE, "max_nodes": 3}]
    with EmulatorProcess(opts.workdir, computes, provisioning_delay=delay) as emu:
        ml_client = emu.ml_client(counter)
        with (
            aml_cluster(emu, ml_client, **cluster_kwargs(COMPUTE, n_nodes=1)) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(1, timeout=60)
            address = cluster._context.state.scheduler_address
            for i in range(reps):
                plain.append(plain_worker_join(client, address, opts.workdir, i))
                cycles.append(adapt_cycle(cluster, client, emu, counter, tasks))
            plain.append(plain_worker_join(client, address, opts.workdir, reps))
    w = median(plain)
    first = median([c["first"] for c in cycles])
    every = median([c["all"] for c in cycles])
    released = median([c["released"] for c in cycles])
    # The first idle decision comes within one interval; the wait_count-th one
    # (wait_count - 1) intervals later: the policy's own share of the release time.
    cooldown = INTERVAL * (WAIT_COUNT - 1)
    rate = median([c["rate"] for c in cycles])
    setup = f"D={delay:g}s, adapt interval={INTERVAL:g}s wait_count={WAIT_COUNT}, n={reps}"
    result = SuiteResult()
    result.rows += [
        Row("scaling", "backlog -> first new worker, minus D, / plain `dask worker` join",
            (first - delay) / w, "x",
            detail=f"minus D: {first - delay:.1f}s, plain worker join {w:.1f}s; {setup}"),
        Row("scaling", "backlog -> first new worker, minus D, / D", (first - delay) / delay, "x",
            detail=f"{first:.1f}s in all; all 3 workers after {every:.1f}s"),
        Row("scaling", "idle -> nodes released, minus adapt cooldown, / D",
            (released - cooldown) / delay, "x",
            detail=f"{released:.1f}s in all, minus {released - cooldown:.1f}s; policy cooldown "
                   f"{cooldown:g}s ((wait_count - 1) x interval, + up to one interval)"),
        Row("scaling", "AML requests/min while scaling 1 -> 3 -> 1 nodes", round(rate, 1),
            "req/min", detail=f"{median([c['requests'] for c in cycles]):g} requests per cycle"),
    ]  # fmt: skip
    result.notes.append(
        "scaling: with the default adapt settings (interval 10 s, wait_count 12) a backlog is "
        "noticed within 10 s and idle worker jobs are released after about 2 minutes: "
        "deliberate cooldowns for AML's minutes-long node start, not latency. On real AML "
        "the provisioning delay D is minutes (node allocation, image pull) and dominates."
    )
    return result
