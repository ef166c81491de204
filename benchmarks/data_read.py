"""Issue 9: read throughput of a multi-file parquet dataset on the cluster, datastore vs local disk.

Subject: ``dd.read_parquet`` of an ``azureml://datastores/...`` dataset resolved
with :func:`dask_amlcompute.data.resolve` (adlfs against Azurite, the Azure
Storage emulator, behind the emulated workspace's datastore), reduced on a
2-node AmlComputeCluster.  Baseline: the same files on local disk, read by the
same cluster (the emulated nodes share this machine's filesystem).  Runs
alternate (B S / S B); the figure is the median of the per-pair time ratios.

Run on its own (appends a section to ``benchmarks/RESULTS.md``)::

    python benchmarks/data_read.py [--quick] [--no-record]

Also usable as a suite module (``run(opts) -> SuiteResult``).  Needs Azurite
(``npm install --no-save --prefix .ci-node azurite`` or ``AZURITE_BIN``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

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
)

COMPUTE = "bench-data"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _write_dataset(n_files: int, rows: int, local_dir: str, fs, remote_url: str) -> int:
    """Write identical parquet files locally and to the datastore; return total bytes."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(9)
    total = 0
    for i in range(n_files):
        frame = pd.DataFrame({f"c{j}": rng.random(rows) for j in range(8)})
        path = os.path.join(local_dir, f"part-{i:03d}.parquet")
        frame.to_parquet(path, compression=None)
        total += os.path.getsize(path)
        with open(path, "rb") as src, fs.open(f"{remote_url}part-{i:03d}.parquet", "wb") as dst:
            dst.write(src.read())
    return total


def _read_all(url: str, storage_options: dict | None) -> float:
    """Seconds to read every column of every file on the cluster (sum of all values)."""
    import dask.dataframe as dd

    start = time.perf_counter()
    df = dd.read_parquet(url, storage_options=storage_options)
    df.sum().compute()
    return time.perf_counter() - start


def run(opts: Options) -> SuiteResult:
    """Measure datastore (Azurite via adlfs) vs local-disk parquet reads on a 2-node cluster."""
    import fsspec
    from distributed import Client

    from aml_emulator import Azurite
    from dask_amlcompute.data import resolve

    n_files = opts.pick(16, 8)
    rows = opts.pick(250_000, 100_000)  # 8 float64 columns: ~18 MB / ~8 MB per file
    reps = opts.pick(5, 3)
    local_dir = tempfile.mkdtemp(prefix="data-read-", dir=opts.workdir)
    with Azurite() as azurite:
        store = azurite.datastore("lake", container="bench")
        emu = EmulatorProcess(opts.workdir, [{"name": COMPUTE, "max_nodes": 2}])
        emu.config["datastores"] = [
            {
                "name": store.name,
                "account": store.account,
                "container": store.container,
                "credential": "account_key",
                "endpoint": store.endpoint,
                "account_key": store.account_key,
            }
        ]
        with emu:
            ml_client = emu.ml_client()
            src = resolve("azureml://datastores/lake/paths/dataset/", ml_client)
            fs = fsspec.filesystem("abfs", **src.storage_options)
            nbytes = _write_dataset(n_files, rows, local_dir, fs, src.url)
            with (
                aml_cluster(emu, ml_client, **cluster_kwargs(COMPUTE, n_nodes=2)) as cluster,
                Client(cluster) as client,
            ):
                client.wait_for_workers(2, timeout=60)
                local_url = local_dir.rstrip("/") + "/"
                base, subj = interleave(
                    lambda: _read_all(local_url, None),
                    lambda: _read_all(src.url, src.storage_options),
                    reps,
                    warmup=1,
                )
    ratio = pair_ratio(subj, base)
    mb = nbytes / 1e6
    result = SuiteResult()
    result.rows.append(
        Row(
            "data_read",
            f"read_parquet {n_files} files ({mb:.0f} MB) on a 2-node cluster, datastore "
            "(adlfs -> Azurite) / local disk, time ratio",
            ratio,
            "x",
            detail=(
                f"datastore median {mb / median(subj):.0f} MB/s ({median(subj):.2f}s), local "
                f"median {mb / median(base):.0f} MB/s ({median(base):.2f}s), n={reps}"
            ),
        )
    )
    result.notes.append(
        "data_read: Azurite is one Node.js process sharing the machine's cores with the "
        "cluster, so the ratio mostly measures Azurite plus the Blob REST/adlfs path, not Azure "
        "Storage: on AML the workers read the storage account over the network, each in parallel."
    )
    return result


def _record(command: str, result: SuiteResult, elapsed: float) -> None:
    import dask

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {now} (data_read)\n",
        f"Command: `{command}` ({elapsed:.0f}s)\n",
        f"- nproc: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        f"- python / dask: {sys.version.split()[0]} / {dask.__version__}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "| suite | metric | result | detail (raw, this machine, this run) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.suite} | {r.metric} | {r.formatted()} | {r.detail} |" for r in result.rows]
    lines += [""] + [f"- {n}" for n in result.notes]
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by `python benchmarks/run.py` and "
            "`python benchmarks/data_read.py`; newest last. Ratios are against a "
            "baseline measured in the same run.\n"
        )
    with RESULTS.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print the row, append it to RESULTS.md unless ``--no-record``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer files and repetitions")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as workdir:
        result = run(Options(quick=args.quick, workdir=Path(workdir)))
    elapsed = time.monotonic() - start
    for row in result.rows:
        print(f"{row.metric}: {row.formatted()}  [{row.detail}]")
    if not args.no_record:
        command = "python benchmarks/data_read.py" + (" --quick" if args.quick else "")
        _record(command, result, elapsed)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
