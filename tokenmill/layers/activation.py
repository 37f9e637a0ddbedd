"""SwiGLU's activation: silu(gate) * up on a fused [.., 2 * d] input or on two tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
