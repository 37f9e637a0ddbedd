"""The 2-bit alternating fit gives a lower weight error than RTN, group by group, in the canonical layout."""

from __future__ import annotations

import pytest
import torch

from tokenmill.quant.codes import QuantSpec, dequantize, quantize_rtn
from tokenmill.quant.w2_fit import fit_weight
from tokenmill.quant.weight_quantizer import WeightQuantizer


def group_errors(spec: QuantSpec, weight: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return (approx - weight).square().reshape(weight.shape[0], -1, spec.group_size).sum(-1)


@pytest.mark.parametrize("spec", [QuantSpec("w2", 64, True), QuantSpec("w2", 32, True), QuantSpec("int4", 32, True)])
def test_fit_beats_rtn_in_every_group(spec: QuantSpec) -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rtn = dequantize(spec, *quantize_rtn(spec, weight))
    fitted = WeightQuantizer(spec, fit=True).fake(weight)
    rtn_groups, fit_groups = group_errors(spec, weight, rtn), group_errors(spec, weight, fitted)
    assert (fit_groups <= rtn_groups + 1e-6).all()  # never worse: a group keeps its best parameters
    gain = 1 - fit_groups.sum() / rtn_groups.sum()
    assert gain > (0.15 if spec.method == "w2" else 0.02)


def test_fit_stores_fractional_zero_points_and_dequantizes_to_its_codes() -> None:
    spec = QuantSpec("w2", 64, True)
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    codes, scales, zeros = fit_weight(spec, weight)
    assert codes.min() >= 0 and codes.max() <= 3 and torch.equal(codes, codes.round())
    assert (zeros != zeros.round()).any()
    qweight, stored_scales, qzeros = WeightQuantizer(spec, fit=True).quantize(weight)
    assert qweight.shape == (16, 32) and qweight.dtype == torch.uint8
    expected = ((codes.reshape(16, 2, 64) - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(16, 128)
    assert torch.allclose(dequantize(spec, qweight, stored_scales, qzeros), expected, atol=1e-6)


def test_fit_needs_groups_and_zero_points() -> None:
    with pytest.raises(ValueError, match="needs a group size and a zero-point"):
        WeightQuantizer(QuantSpec("int4", 32), fit=True)
