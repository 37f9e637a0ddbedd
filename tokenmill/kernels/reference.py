"""Torch twins of the layer kernels: on the CPU they are the implementation, on a GPU the test oracle.

Each function computes exactly what the Hugging Face reference computes (dtypes and rounding included),
so float32 logits match transformers to rounding. A fast kernel beside these must agree with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back to x's dtype, then scale (the reference's order of rounding)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # the fused op; identical rounding in float32
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused into the next layer's norm."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def offset_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: scale by (1 + weight), all in float32, and cast back last (Gemma's order of rounding,
    unlike rms_norm's cast-then-scale)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(x.dtype)


def add_offset_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset_rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return offset_rms_norm(summed, weight, eps), summed


def rotary_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype) -> torch.Tensor:
    """[max_positions, 2, head_dim]: cos and sin of every position, computed in float32 then cast, as the
    reference computes them per step."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((angles.cos(), angles.sin()), dim=1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE. x [T, heads, head_dim]; cos/sin [T, 1, rotary_dim] in x's dtype. With
    rotary_dim < head_dim (partial rotary) only the leading rotary_dim features turn; the rest pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on a fused [T, 2 * I] gate/up projection: silu(gate) * up -> [T, I]."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU's activation (Gemma) on a fused [T, 2 * I] gate/up projection: gelu_tanh(gate) * up -> [T, I]."""
    half = gate_up.shape[-1] // 2
    return F.gelu(gate_up[..., :half], approximate="tanh") * gate_up[..., half:]


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): squashes scores into (-cap, cap) (Gemma 2's attention and final logits)."""
    return torch.tanh(x / cap) * cap


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write keys/values [T, kv_heads, head_dim] to their slots of a [2, blocks, block_size, kv_heads,
    head_dim] cache (slot = block * block_size + offset)."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    pair = torch.stack((key, value))
    flat.index_copy_(1, slot_mapping, pair if pair.dtype == kv_cache.dtype else pair.to(kv_cache.dtype))
