"""benchmarks/triton_kernels.py (the GPU speed table of the attention kernels) runs end to end at toy shapes
under the interpreter, so it is ready when a GPU is."""

from __future__ import annotations

import json

import pytest

from tests.kernels.interpreted import REPO, run_script_interpreted

pytest.importorskip("triton")  # tests extra: the kernels need it, even interpreted


def test_tiny_run_prints_the_table_and_writes_every_shape(tmp_path) -> None:
    out = tmp_path / "kernels.json"
    printed = run_script_interpreted(REPO / "benchmarks" / "triton_kernels.py", "--tiny", "--out", str(out))
    assert "| shape | triton µs | torch µs |" in printed
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["tiny decode", "tiny prefill"]
    assert all(r["triton_us"] > 0 and r["torch_us"] > 0 for r in rows)
