"""Run the dask-amlcompute benchmarks, print a table, append it to ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/run.py [--quick] [--only NAME ...] [--no-record]

Every figure is a ratio against a baseline measured in the same run (or a
count of AML requests): other work shares this machine, so absolute times are
not comparable between runs. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
#: Suites in the order they run; each is a module here with ``run(opts) -> SuiteResult``.
SUITES = (
    "startup",
    "envbuild",
    "throughput",
    "control_plane",
    "tunnel",
    "jobssh",
    "scaling",
    "scale",
    "roundtrips",
    "startsize",
)
#: Suites run only when named with ``--only`` (extra dependencies, research questions).
OPT_IN = ("forwarders",)


def machine_facts() -> list[tuple[str, str]]:
    """What the numbers were measured on."""
    import asyncssh
    import azure.ai.ml
    import dask
    import distributed

    try:
        ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
        ssh_version = (ssh.stderr or ssh.stdout).strip()
    except (OSError, subprocess.SubprocessError):
        ssh_version = "not installed"
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "dask_amlcompute"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        rev += " (+ uncommitted changes in dask_amlcompute/)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    return [
        ("nproc", f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})"),
        ("python", platform.python_version()),
        ("dask / distributed", f"{dask.__version__} / {distributed.__version__}"),
        ("azure-ai-ml / asyncssh", f"{azure.ai.ml.__version__} / {asyncssh.__version__}"),
        ("OpenSSH client", ssh_version),
        ("platform", platform.platform()),
        ("git", rev),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def table(rows) -> str:
    """The results as a Markdown table."""
    lines = [
        "| suite | metric | result | target | status | detail (raw, this machine, this run) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.suite} | {r.metric} | {r.formatted()} | {r.target or '-'} | {r.status()} "
            f"| {r.detail} |"
        )
    return "\n".join(lines)


def record(command: str, facts, body: str, notes: list[str], elapsed: float) -> None:
    """Append a dated section to RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"\n## {now}\n", f"Command: `{command}` ({elapsed:.0f}s)\n"]
    parts += [f"- {k}: {v}" for k, v in facts]
    parts += ["", body, ""]
    parts += [f"- {n}" for n in notes]
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by `python benchmarks/run.py`; newest last. "
            "Ratios are against a baseline measured in the same run.\n"
        )
    with RESULTS.open("a") as f:
        f.write("\n".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the selected suites; exit 0 unless a suite crashed (a missed target is reported)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller work")
    parser.add_argument("--only", nargs="+", choices=SUITES + OPT_IN, metavar="NAME",
                        help=f"run only these suites: {', '.join(SUITES + OPT_IN)}")  # fmt: skip
    parser.add_argument("--sizes", nargs="+", type=int, default=(), metavar="N",
                        help="cluster sizes, for the suites that take them (startsize)")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=None, metavar="N",
                        help="measured pairs per size (startsize; default: its PAIRS)")  # fmt: skip
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(BENCH_DIR))
    common = importlib.import_module("common")

    names = [s for s in SUITES + OPT_IN if s in (args.only or SUITES)]
    facts = machine_facts()
    for key, value in facts:
        print(f"{key}: {value}")
    started = time.monotonic()
    rows, notes, failed = [], [], []
    with tempfile.TemporaryDirectory(prefix="dask-amlcompute-bench-") as tmp:
        opts = common.Options(args.quick, Path(tmp), tuple(args.sizes), args.pairs)
        for name in names:
            print(f"\n== {name} ==", flush=True)
            t0 = time.monotonic()
            try:
                module = importlib.import_module(name)
                result = module.run(opts)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                notes.append(f"{name}: FAILED to run (see the console output); no figures.")
                continue
            for row in result.rows:
                print(f"  {row.metric}: {row.formatted()} [{row.status()}] {row.detail}")
            print(f"  ({time.monotonic() - t0:.0f}s)", flush=True)
            rows += result.rows
            notes += result.notes
    elapsed = time.monotonic() - started
    body = table(rows)
    print("\n" + body)
    for note in notes:
        print(f"- {note}")
    if not args.no_record:
        command = "python benchmarks/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        record(command.strip(), facts, body, notes, elapsed)
        print(f"\nappended to {RESULTS.relative_to(REPO)}")
    if shutil.which("ssh") is None:
        print("note: OpenSSH client missing; the ssh -L row was not measured")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
