"""GPTQ lowers a layer's output error below RTN's on correlated inputs, and its stored codes are what it reports."""

from __future__ import annotations

import pytest
import torch

from tokenmill.quant.codes import QuantSpec, codes_of, dequantize
from tokenmill.quant.gptq import InputStatistics, gptq_quantize, output_error
from tokenmill.quant.weight_quantizer import WeightQuantizer


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Activations with a few strong shared directions and uneven channel scales, as real ones have."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width**0.5
    mixing += 3 * torch.randn(width, 4, generator=generator) @ torch.randn(4, width, generator=generator) / width**0.5
    channel_scale = torch.rand(width, generator=generator) * 2 + 0.1
    return (torch.randn(tokens, width, generator=generator) @ mixing) * channel_scale


@pytest.mark.parametrize(("spec", "fit"), [
    (QuantSpec("int4", 32), False), (QuantSpec("int4", 64, True), False), (QuantSpec("int8"), False),
    (QuantSpec("w2", 32, True), True),
])
def test_gptq_output_error_is_below_rtn(spec: QuantSpec, fit: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    inputs = correlated_inputs(2048, 256, seed=1)
    stats = InputStatistics(256)
    for chunk in inputs.split(512):
        stats.add(chunk)
    quantizer = WeightQuantizer(spec, fit)
    in_order = gptq_quantize(quantizer, weight, stats, act_order=False)
    result = gptq_quantize(quantizer, weight, stats)  # act-order, the default
    rtn_error = output_error(weight, quantizer.fake(weight), stats.xxt)
    assert in_order.loss < 0.8 * rtn_error
    assert result.loss < 0.8 * in_order.loss  # measured 0.4-0.6 here: act-order pays on uneven channels
    # The reported loss is the true ||W X - W' X||^2 of the stored weight.
    stored = dequantize(spec, *result.stored)
    assert torch.allclose(stored, result.dequantized, atol=1e-6)
    direct = float((inputs.double() @ (weight - stored).double().T).square().sum())
    assert result.loss == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_are_in_range_and_shapes_canonical(act_order: bool) -> None:
    spec = QuantSpec("int4", 32, True)
    weight = torch.randn(40, 128, generator=torch.Generator().manual_seed(3))
    stats = InputStatistics(128)
    stats.add(correlated_inputs(512, 128, seed=4))
    result = gptq_quantize(WeightQuantizer(spec), weight, stats, act_order=act_order)
    qweight, scales, qzeros = result.stored
    assert torch.equal(dequantize(spec, qweight, scales, qzeros), result.dequantized)
    assert qweight.shape == spec.qweight_shape(40, 128) and qweight.dtype == torch.uint8
    assert scales.shape == qzeros.shape == (40, 4) and scales.dtype == qzeros.dtype == torch.float32
    assert int(codes_of(spec, qweight).max()) <= 15


def test_gptq_survives_channels_no_input_touches() -> None:
    """A column whose input is always zero gets weight 0 (it cannot matter) instead of a singular Hessian."""
    inputs = correlated_inputs(256, 64, seed=5)
    inputs[:, 7] = 0
    stats = InputStatistics(64)
    stats.add(inputs)
    result = gptq_quantize(WeightQuantizer(QuantSpec("int4", 32)), torch.randn(16, 64), stats)
    assert torch.isfinite(result.dequantized).all() and result.loss >= 0


def test_gptq_fp8_codes_are_e4m3_values_and_beat_rtn() -> None:
    """fp8 is one group per row: GPTQ rounds each column to the e4m3 grid of its row's scale, and its error
    compensation lowers the output error below per-channel RTN's."""
    spec = QuantSpec("fp8")
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(6))
    inputs = correlated_inputs(1024, 128, seed=7)
    stats = InputStatistics(128)
    stats.add(inputs)
    quantizer = WeightQuantizer(spec)
    result = gptq_quantize(quantizer, weight, stats)
    qweight, scales, qzeros = result.stored
    assert qweight.dtype == torch.float8_e4m3fn and qweight.shape == (48, 128) and qzeros is None
    assert scales.shape == (48, 1) and scales.dtype == torch.float32
    assert torch.equal(dequantize(spec, qweight, scales), result.dequantized)
    # The static per-row scale is RTN's (amax / 448), so the codes stay inside e4m3's finite range.
    assert torch.equal(scales, quantizer.quantize(weight)[1])
    assert float(qweight.float().abs().max()) <= 448.0
    assert result.loss < 0.6 * output_error(weight, quantizer.fake(weight), stats.xxt)
