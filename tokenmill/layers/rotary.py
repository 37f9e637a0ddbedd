"""Rotary position embedding (rotate-half / NeoX layout), with Llama-3 or linear frequency scaling and
partial rotary (only the leading fraction of each head's features turn, as in Phi-4-mini).

inv_freq and the angles are computed in float32 the way the reference does, once for every position,
so a step only looks its positions up; float32 logits match the reference to rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenmill.kernels.dispatch import use_triton_kernels
from tokenmill.kernels.reference import apply_rotary, rotary_cos_sin_cache


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if "inv_freq_factors" in scaling:  # Llama-3 scaling as a GGUF holds it: one divisor per frequency
        return inv_freq / torch.tensor(scaling["inv_freq_factors"], dtype=torch.float32)
    factor = float(scaling["factor"])
    if scaling.get("rope_type") == "linear":  # positions interpolated: every frequency slowed by the factor
        return inv_freq / factor
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int,
                 dtype: torch.dtype, device: torch.device, partial_rotary_factor: float = 1.0) -> None:
        super().__init__()
        rotary_dim = int(head_dim * partial_rotary_factor)
        inv_freq = rope_inv_freq(rotary_dim, theta, scaling).to(device)
        # [max_positions, 2, rotary_dim]: cos, sin in the model dtype (the reference casts them the same way).
        self.register_buffer("cos_sin", rotary_cos_sin_cache(inv_freq, max_positions, dtype), persistent=False)

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, rotary_dim] of the step's positions: looked up once, shared by every layer."""
        table = self.cos_sin[positions]
        return table[:, 0:1], table[:, 1:2]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if use_triton_kernels(x):
            from tokenmill.kernels import triton_rotary

            return triton_rotary.apply_rotary(x, cos, sin)
        return apply_rotary(x, cos, sin)
