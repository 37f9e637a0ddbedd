"""Gated activations on a fused gate/up projection: SwiGLU (Llama family) and GeGLU with the tanh
approximation of GELU (Gemma). Their kernel twins are in kernels.reference."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.reference import gelu_tanh_and_mul, silu_and_mul


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)


class GeluTanhAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_and_mul(gate_up)
