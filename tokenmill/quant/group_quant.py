"""Codes for given scales and zero-points, and the choice of those per group: the pieces GPTQ, AWQ and the
2-bit fit share. `codes.quantize_rtn` owns the round-to-nearest choice of scales; this file only applies it to a
block of columns and rounds columns against chosen parameters, in the canonical convention
W = (code - zero) * scale (int8 is symmetric: zero 0, codes -128..127)."""

from __future__ import annotations

from dataclasses import replace

import torch

from tokenmill.quant.codes import FP8_MAX, QuantSpec, pack_codes, quantize_rtn


def code_range(spec: QuantSpec) -> tuple[int, int]:
    """(lowest, highest) integer code of a method."""
    if spec.method == "int8":
        return -128, 127
    if spec.method == "fp8":
        raise ValueError("fp8 has no integer codes")
    return 0, (1 << spec.bits) - 1


def block_params(spec: QuantSpec, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN scales and zero-points [out] for one block of columns treated as a single group."""
    width = block.shape[1]
    # One group spanning the block: a group size of the block's width (per-channel int8 keeps None).
    one_group = replace(spec, group_size=width) if spec.group_size is not None else spec
    _, scales, zeros = quantize_rtn(one_group, block)
    zeros = torch.zeros_like(scales) if zeros is None else zeros
    return scales[:, 0], zeros[:, 0]


def round_codes(spec: QuantSpec, columns: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Float codes of columns [out, k] against per-row scales and zeros [out] (or [out, k] broadcast). fp8's codes
    are the e4m3 values themselves (rounded to nearest even by the cast), held in float32."""
    scales = scales if scales.dim() == columns.dim() else scales.unsqueeze(-1)
    zeros = zeros if zeros.dim() == columns.dim() else zeros.unsqueeze(-1)
    if spec.method == "fp8":
        return (columns / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    low, high = code_range(spec)
    return torch.clamp(torch.round(columns / scales + zeros), low, high)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    scales = scales if scales.dim() == codes.dim() else scales.unsqueeze(-1)
    zeros = zeros if zeros.dim() == codes.dim() else zeros.unsqueeze(-1)
    return (codes - zeros) * scales


def stored_tensors(spec: QuantSpec, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float codes [out, in] and per-group scales/zeros [out, groups] -> the canonical (qweight, scales, qzeros)."""
    scales = scales.float().contiguous()
    if spec.method == "int8":
        return codes.to(torch.int8), scales, None
    if spec.method == "fp8":  # codes are e4m3 values already: the cast is exact
        return codes.to(torch.float8_e4m3fn), scales, None
    return pack_codes(codes.to(torch.uint8), spec.bits), scales, zeros.float().contiguous()
