"""The README's demo command, run as a newcomer runs it: correct results, clean output."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _helpers import foreign_lines

pytestmark = pytest.mark.slow


#: The demo's own lines: where the emulator is, the startup phases, the workloads' results.
DEMO_LINES = (
    r"AML emulator at \S+ \(workspace \S+, \w+ node network\)",
    r"Nodes on this machine's loopback \(no isolated network here: .+\)",
    r"Startup: .+",
    r"Connected: .+",
    r"Cluster \S+: \d+ workers, dashboard \S+",
    r"  ok {4}[^:]+: .+",
    r"Main job \S+: \w+; nodes in use: 0",
    r"All results correct in [\d.]+s",
)


def test_demo_prints_results_and_startup_phases_without_sdk_noise():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from dask_amlcompute.cli import main; sys.exit(main(['demo']))",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "All results correct" in proc.stdout
    phases = next(line for line in proc.stdout.splitlines() if line.startswith("Startup: "))
    for phase in ("submitted", "Running", "scheduler address", "connected", "workers joined"):
        assert phase in phases, phases
    # nothing but the library's progress and the demo's lines: no SDK notice ("Class ...Schema:
    # This is an experimental class"), upload bar ("Uploading 0ac58... (0.47 MBs)"), colour reset
    foreign = foreign_lines(proc.stdout + proc.stderr, *DEMO_LINES)
    assert not foreign, "\n".join(map(repr, foreign))
