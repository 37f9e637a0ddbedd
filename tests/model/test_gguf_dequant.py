"""GGUF dequantization: tokenmill's torch path equals gguf.quants bit for bit, for every type it supports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.models.gguf.dequant import NATIVE_TYPES, UnsupportedType, dequantize, load_dequantizer

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

# Byte offsets of the float16 scale fields per K-quant block: random bytes there could be inf/nan.
_HALF_FIELDS = {"Q2_K": (80, 84), "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}
_QUANTIZABLE = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # gguf.quants can write these


def _encoded(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` x `cols` values in type `name`, as the uint8 bytes a GGUF file holds."""
    qtype = GGMLQuantizationType[name]
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if name == "F32":
        return values.view(np.uint8).reshape(-1)
    if name == "F16":
        return values.astype(np.float16).view(np.uint8).reshape(-1)
    if name in _QUANTIZABLE:
        return np.ascontiguousarray(gguf.quants.quantize(values, qtype)).reshape(-1)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)  # any quant bits are valid
    start, end = _HALF_FIELDS[name]
    blocks[:, start:end] = rng.standard_normal((blocks.shape[0], (end - start) // 2)).astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


@pytest.mark.parametrize("name", list(NATIVE_TYPES) + ["Q2_K", "Q3_K"])
def test_dequantize_equals_gguf_quants(name):
    rng = np.random.default_rng(0)
    rows, cols = 6, 512
    raw = _encoded(name, rows, cols, rng)
    expected = gguf.quants.dequantize(raw.reshape(rows, -1), GGMLQuantizationType[name])
    got = dequantize(raw, GGMLQuantizationType[name].value, (rows, cols))
    assert got.dtype == torch.float32 and tuple(got.shape) == (rows, cols)
    assert np.array_equal(got.numpy().view(np.uint32), np.asarray(expected, dtype=np.float32).view(np.uint32))


def test_native_types_cover_the_common_ones():
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"} <= set(NATIVE_TYPES)


def test_a_type_nobody_dequantizes_is_refused_with_the_supported_list():
    with pytest.raises(UnsupportedType, match=r"not supported \(supported: F32, F16, BF16, .*Q6_K"):
        load_dequantizer(GGMLQuantizationType.Q8_K.value)


def test_without_the_gguf_package_rare_types_name_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf.quants", None)  # import fails
    with pytest.raises(UnsupportedType, match=r"needs the gguf package \(pip install 'tokenmill\[gguf\]'"):
        load_dequantizer(GGMLQuantizationType.Q3_K.value)
    load_dequantizer(GGMLQuantizationType.Q4_K.value)  # built in: no package needed
