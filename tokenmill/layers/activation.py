"""Gated activations on a fused gate/up projection: SwiGLU (Llama family) and GeGLU with the tanh
approximation of GELU (Gemma). Their kernel twins are in kernels.reference."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.dispatch import use_triton_kernels
from tokenmill.kernels.reference import gelu_tanh_and_mul, silu_and_mul


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if use_triton_kernels(gate_up):
            from tokenmill.kernels import triton_activation

            return triton_activation.silu_and_mul(gate_up)
        return silu_and_mul(gate_up)


class GeluTanhAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if use_triton_kernels(gate_up):
            from tokenmill.kernels import triton_activation

            return triton_activation.gelu_tanh_and_mul(gate_up)
        return gelu_tanh_and_mul(gate_up)
