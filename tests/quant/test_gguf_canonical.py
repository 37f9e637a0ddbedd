"""GGUF blocks repacked into the canonical quantized weight: Q8_0, Q4_0 exact, Q4_1 and Q4_K exact up to one
float32 rounding (blocks with a zero scale exact too), other types re-quantized, and the spec a file gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.models.gguf.canonical import canonical_weight, repacks_exactly
from tokenmill.models.gguf.dequant import dequantize
from tokenmill.models.gguf.reader import TensorInfo
from tokenmill.quant.codes import QuantSpec, codes_of
from tokenmill.quant.codes import dequantize as canonical_dequantize

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

ROWS, COLS = 8, 512
INT8_G32, INT4_G32, INT4_G32_ZP = QuantSpec("int8", 32), QuantSpec("int4", 32), QuantSpec("int4", 32, True)


def _blocks(name: str, rng: np.random.Generator) -> np.ndarray:
    """ROWS x COLS values written as type `name` (gguf.quants for the simple types, random bits for Q4_K)."""
    qtype = GGMLQuantizationType[name]
    values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if name != "Q4_K":
        return np.ascontiguousarray(gguf.quants.quantize(values, qtype)).reshape(-1)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(ROWS * COLS // block, size), dtype=np.uint8)
    blocks[:, 0:4] = (rng.standard_normal((blocks.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


def _info(name: str) -> TensorInfo:
    qtype = GGMLQuantizationType[name]
    block, size = GGML_QUANT_SIZES[qtype]
    return TensorInfo("blk.0.ffn_up.weight", (ROWS, COLS), qtype.value, 0, ROWS * COLS // block * size)


def _round_trip(name: str, spec: QuantSpec, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    info = _info(name)
    canonical = canonical_weight(raw, info, spec)
    qweight, scales, qzeros = canonical
    assert tuple(qweight.shape) == spec.qweight_shape(ROWS, COLS) and qweight.dtype == spec.qweight_dtype()
    assert tuple(scales.shape) == (ROWS, COLS // 32) and scales.dtype == torch.float32
    return canonical_dequantize(spec, *canonical), dequantize(raw, info.type_id, info.shape), canonical


@pytest.mark.parametrize("name, spec", [("Q8_0", INT8_G32), ("Q4_0", INT4_G32), ("Q4_0", INT4_G32_ZP)])
def test_q8_0_and_q4_0_repack_exactly(name, spec):
    got, expected, (qweight, _, qzeros) = _round_trip(name, spec, _blocks(name, np.random.default_rng(0)))
    assert torch.equal(got, expected)
    if name == "Q4_0":
        assert torch.equal(qzeros, torch.full_like(qzeros, 8.0))
        assert int(codes_of(spec, qweight).max()) <= 15
    else:
        assert qzeros is None


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K"])
def test_q4_1_and_q4_k_repack_with_fractional_zero_points(name):
    got, expected, (_, scales, qzeros) = _round_trip(name, INT4_G32_ZP, _blocks(name, np.random.default_rng(1)))
    assert not torch.equal(qzeros, qzeros.round())  # zero = -min / d: fractional
    # (code - zero) * scale against scale * code + min: equal up to float32 rounding of the block's values
    scale = expected.abs().reshape(ROWS, -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(ROWS, COLS)
    assert bool(((got - expected).abs() <= 4e-7 * scale + 1e-12).all())
    if name == "Q4_K":  # random 6-bit sub-block scales include 0: those groups are constants, exactly
        constant = (scales == 1).reshape(-1)
        assert int(constant.sum()) > 0
        assert torch.equal(got.reshape(-1, 32)[constant], expected.reshape(-1, 32)[constant])


def test_a_q4_1_block_with_zero_scale_is_exact():
    raw = _blocks("Q4_1", np.random.default_rng(2))
    blocks = raw.reshape(-1, 20)
    blocks[:3, 0:2] = np.zeros(1, dtype=np.float16).view(np.uint8)  # d = 0: every value is the block's min
    blocks[3, 0:2] = np.array([6e-8], dtype=np.float16).view(np.uint8)  # subnormal d, large min: zero ~1e12
    blocks[3, 2:4] = np.array([-60000.0], dtype=np.float16).view(np.uint8)
    got, expected, (qweight, scales, qzeros) = _round_trip("Q4_1", INT4_G32_ZP, raw)
    per_block = lambda t: t.reshape(-1, 32)  # noqa: E731
    assert torch.equal(per_block(got)[:3], per_block(expected)[:3])
    assert torch.isfinite(qzeros).all() and bool((scales.reshape(-1)[:3] == 1).all())
    assert torch.allclose(per_block(got)[3], per_block(expected)[3], rtol=2e-7, atol=0)  # within rounding of m


@pytest.mark.parametrize("name, spec", [("Q5_K", INT4_G32_ZP), ("Q4_1", INT4_G32), ("Q8_0", QuantSpec("int8", 64)),
                                        ("F16", INT8_G32)])
def test_other_types_are_requantized_round_to_nearest(name, spec):
    rng = np.random.default_rng(3)
    if name == "Q5_K":
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K]
        raw = rng.integers(0, 256, size=(ROWS * COLS // block, size), dtype=np.uint8)
        raw[:, 0:4] = (rng.standard_normal((raw.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
        raw = raw.reshape(-1)
    elif name == "F16":
        raw = rng.standard_normal((ROWS, COLS)).astype(np.float16).view(np.uint8).reshape(-1)
    else:
        raw = _blocks(name, rng)
    info = _info(name) if name != "F16" else TensorInfo("blk.0.ffn_up.weight", (ROWS, COLS), 1, 0, ROWS * COLS * 2)
    assert not repacks_exactly(info.type_id, spec)
    qweight, scales, qzeros = canonical_weight(raw, info, spec)
    from tokenmill.quant.codes import quantize_rtn
    expected = quantize_rtn(spec, dequantize(raw, info.type_id, info.shape))
    assert torch.equal(qweight, expected[0]) and torch.equal(scales, expected[1])
