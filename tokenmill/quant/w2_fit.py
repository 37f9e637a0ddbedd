"""The alternating fit of low-bit group parameters (the 2-bit post-training method): starting from RTN with a
zero-point, alternate (a) fix scale and zero-point, round the codes; (b) fix the codes, solve scale and
zero-point per group in closed form by least squares (w ~ scale * code + offset, zero = -offset / scale);
stop when the weight error stops falling. Zero-points come out fractional, which the canonical layout allows.
"""

from __future__ import annotations

import torch

from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.group_quant import block_params, dequantize_codes, round_codes

MAX_ITERATIONS = 20
MIN_RELATIVE_GAIN = 1e-4  # a round that lowers the error by less than this fraction ends the fit


def _least_squares(grouped: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the scale and zero minimising sum (w - scale * (code - zero))^2 for fixed codes."""
    code_mean, w_mean = codes.mean(-1), grouped.mean(-1)
    centred = codes - code_mean.unsqueeze(-1)
    variance = (centred * centred).sum(-1)
    covariance = (centred * (grouped - w_mean.unsqueeze(-1))).sum(-1)
    # A group whose codes are all equal (or whose slope would flip sign) keeps its scale; only the offset moves.
    solvable = (variance > 0) & (covariance > 0)
    new_scales = torch.where(solvable, covariance / variance.clamp(min=1e-30), scales)
    offsets = w_mean - new_scales * code_mean
    return new_scales, -offsets / new_scales


def fit_grouped(spec: QuantSpec, grouped: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grouped [..., group]; scales/zeros [...] to start from -> (codes, scales, zeros), never worse than the start."""
    codes = round_codes(spec, grouped, scales, zeros)
    best_error = (dequantize_codes(codes, scales, zeros) - grouped).square().sum(-1)
    for _ in range(MAX_ITERATIONS):
        new_scales, new_zeros = _least_squares(grouped, codes, scales, zeros)
        new_codes = round_codes(spec, grouped, new_scales, new_zeros)
        error = (dequantize_codes(new_codes, new_scales, new_zeros) - grouped).square().sum(-1)
        better = error < best_error  # per group: a group whose error rose keeps its previous parameters
        gain = (best_error.sum() - torch.where(better, error, best_error).sum()) / best_error.sum().clamp(min=1e-30)
        scales = torch.where(better, new_scales, scales)
        zeros = torch.where(better, new_zeros, zeros)
        codes = torch.where(better.unsqueeze(-1), new_codes, codes)
        best_error = torch.where(better, error, best_error)
        if gain < MIN_RELATIVE_GAIN:
            break
    return codes, scales, zeros


def fit_block(spec: QuantSpec, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitted scale and zero [out] of one group of columns [out, group] (GPTQ picks a group's parameters so)."""
    scales, zeros = block_params(spec, block)
    _, scales, zeros = fit_grouped(spec, block, scales, zeros)
    return scales, zeros


def fit_weight(spec: QuantSpec, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float codes [out, in], scales [out, groups], zeros [out, groups])."""
    if spec.group_size is None or not spec.zero_point:
        raise ValueError(f"the alternating fit needs a group size and a zero-point, got {spec}")
    out, width = weight.shape
    grouped = weight.float().reshape(out, spec.groups(width), spec.group_size)
    start_scales, start_zeros = block_params(spec, grouped.reshape(-1, spec.group_size))
    codes, scales, zeros = fit_grouped(spec, grouped, start_scales.reshape(out, -1), start_zeros.reshape(out, -1))
    return codes.reshape(out, width), scales, zeros
