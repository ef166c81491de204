"""The README's demo command, run as a newcomer runs it: correct results, clean output."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


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
    # azure-ai-ml prints "Class ...Schema: This is an experimental class" notices unless filtered
    assert "experimental" not in proc.stderr, proc.stderr
