"""The variant comparison's argument parsing and its per-round ratios."""

from __future__ import annotations

import pytest

from benchmarks.variant_speed import parse_variant, ratio_lines


def test_variants_parse_into_label_kind_and_value() -> None:
    assert parse_variant("int8=tokenmill:--model m --quantization int8") == (
        "int8", "tokenmill", "--model m --quantization int8")
    assert parse_variant("llama.cpp Q8_0=llamacpp:/m/q8.gguf") == ("llama.cpp Q8_0", "llamacpp", "/m/q8.gguf")


@pytest.mark.parametrize("spec", ["int8", "int8=vllm:x", "=tokenmill:x", "int8=tokenmill:"])
def test_bad_variants_are_refused(spec: str) -> None:
    with pytest.raises(SystemExit, match="--variant takes"):
        parse_variant(spec)


def test_ratios_are_medians_of_per_round_ratios() -> None:
    figures = {1: {"a": [10.0, 30.0, 20.0], "b": [10.0, 10.0, 40.0]}}
    assert ratio_lines(figures, [("a", "b")]) == ["batch 1: a / b = 1.00x median (rounds 1.00, 3.00, 0.50)"]
