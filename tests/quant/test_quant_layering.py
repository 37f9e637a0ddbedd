"""quant/ sits below models/ in docs/architecture.md (a loader may use its format conversions): it imports
layers, kernels and errors, never models or anything above them."""

from __future__ import annotations

from tests.unit.test_layering import ABOVE_MODEL_CODE, _files, _violations


def test_quant_imports_nothing_above_it() -> None:
    assert _violations(_files("quant"), ABOVE_MODEL_CODE + ("tokenmill.models", "tokenmill.platform",
                                                            "tokenmill.config")) == []
