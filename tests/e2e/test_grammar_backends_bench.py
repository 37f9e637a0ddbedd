"""The grammar-backend benchmark stays runnable as a module (its backend-only table needs only llguidance)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llguidance")

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_backend_only_table_runs_as_a_module():
    # A subprocess: the benchmark pins torch to one thread, which must not leak into the test session.
    args = ["--backend-only", "--big-vocab", "0", "--big-walks", "1", "--cap", "20"]
    done = subprocess.run([sys.executable, "-m", "tokenmill.bench.grammar_backends", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "## tokenmill backend (llguidance), nested schema" in done.stdout
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| measure")}
    assert float(rows["first_compile_ms"]) > 0 and float(rows["fill_us_mean"]) > 0
