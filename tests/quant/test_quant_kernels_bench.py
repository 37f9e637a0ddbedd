"""benchmarks/quant_kernels.py runs (on tiny shapes) and reports every path at every batch."""

from __future__ import annotations

import pytest

from benchmarks.quant_kernels import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # main() sets the thread count; the fixture restores it


def test_the_benchmark_runs_on_tiny_shapes() -> None:
    lines = main(["--tiny", "--threads", "1", "--batch", "1", "3", "--layers", "2"])
    text = "\n".join(lines)
    for name in ("float", "int8pack", "int4pack", "tiled-int8", "tiled-int4", "tiled-w2", "tiled-fp8", "w8a8-fbgemm"):
        assert text.count(f"  {name} ") == 2, name
    assert "int8: " in text and "is faster at batch 3" in text
