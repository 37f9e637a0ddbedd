"""SwiGLU's activation on a fused gate/up projection (the kernel twin is kernels.reference.silu_and_mul)."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.reference import silu_and_mul


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)
