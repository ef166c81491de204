"""The benchmark scripts still run: one cheap suite, quick, without recording results."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def test_quick_startup_benchmark_runs_and_prints_a_ratio():
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "startup", "--no-record"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\| startup \|.*\| \d+\.\d\dx \|", proc.stdout), proc.stdout[-3000:]
