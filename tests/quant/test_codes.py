"""The canonical quantized layout: packing is exact and reversible, RTN codes dequantize near the weight."""

from __future__ import annotations

import pytest
import torch

from tokenmill.errors import ConfigError
from tokenmill.quant.codes import QuantSpec, dequantize, pack_codes, quantize_rtn, unpack_codes


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_round_trip_and_bit_order(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (5, 32), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 32 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes.to(torch.uint8))
    first = codes[0, : 8 // bits].tolist()
    assert packed[0, 0].item() == sum(c << (k * bits) for k, c in enumerate(first))  # column k at bits k*b


@pytest.mark.parametrize(("spec", "max_rel_err"), [
    (QuantSpec("int8"), 0.01), (QuantSpec("int8", 32), 0.01), (QuantSpec("fp8"), 0.04),
    (QuantSpec("int4", 128), 0.12), (QuantSpec("int4", 32, True), 0.1), (QuantSpec("w2", 64, True), 0.5),
])
def test_rtn_dequantizes_near_the_weight(spec: QuantSpec, max_rel_err: float) -> None:
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    qweight, scales, qzeros = quantize_rtn(spec, weight)
    assert tuple(qweight.shape) == spec.qweight_shape(48, 256) and qweight.dtype == spec.qweight_dtype()
    assert scales.shape == (48, spec.groups(256))
    error = (dequantize(spec, qweight, scales, qzeros) - weight).norm() / weight.norm()
    assert 0 < error < max_rel_err


def test_zero_points_shift_codes() -> None:
    spec = QuantSpec("int4", 8, True)
    qweight = pack_codes(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 15]]), 4)
    weight = dequantize(spec, qweight, torch.tensor([[0.5]]), torch.tensor([[2.0]]))
    assert weight.tolist() == [[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 6.5]]


@pytest.mark.parametrize(("args", "message"), [
    (("nf4",), "unknown method 'nf4'"), (("int4",), "multiple of 8, got None"), (("int4", 12), "got 12"),
    (("fp8", 32), "fp8 takes no group size"), (("int8", None, True), "int8 is symmetric"),
])
def test_bad_specs_name_the_setting(args: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantSpec(*args)


def test_group_must_divide_the_width() -> None:
    with pytest.raises(ConfigError, match="group size 128 does not divide the layer width 96"):
        QuantSpec("int4", 128).groups(96)


def test_config_round_trip() -> None:
    spec = QuantSpec("w2", 64, True)
    assert QuantSpec.from_config(spec.to_config()) == spec
    with pytest.raises(ConfigError, match="quant_method"):
        QuantSpec.from_config({"quant_method": "gptq"})
