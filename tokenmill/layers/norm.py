"""RMSNorm, optionally with the residual add fused in (the kernel twins are kernels.reference.add_rms_norm and,
for Gemma's (1 + weight) variant, add_offset_rms_norm)."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.dispatch import use_triton_kernels
from tokenmill.kernels.reference import add_offset_rms_norm, add_rms_norm, offset_rms_norm, rms_norm


class RMSNorm(nn.Module):
    identity_weight = 1.0  # the weight that makes the scale 1 (random-weight models start from it)
    offset = False  # scale by (1 + weight): Gemma's variant

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), self.identity_weight, dtype=dtype, device=device),
                                   requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton_kernels(x):
            return self._triton(x, None)[0]
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); before the first layer there is no residual yet: (norm(x), x)."""
        if residual is None:
            return self(x), x
        if use_triton_kernels(x):
            return self._triton(x, residual)
        return self._add_norm(x, residual)

    def _triton(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels.triton_norm import fused_rms_norm

        return fused_rms_norm(x, residual, self.weight, self.eps, self.offset)

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores weight - 1, so the scale is (1 + weight); an identity norm has
    zero weights."""

    identity_weight = 0.0
    offset = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton_kernels(x):
            return self._triton(x, None)[0]
        return offset_rms_norm(x, self.weight, self.eps)

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_offset_rms_norm(x, residual, self.weight, self.eps)
