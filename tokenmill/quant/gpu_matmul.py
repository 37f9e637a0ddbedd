"""The CUDA path shared by the integer methods: the Triton W8A16 / W4A16 / W2A16 kernels on the canonical
tensors transposed to [K / per_byte, N] and [groups, N] (output channels contiguous, so loads coalesce), or
their torch twin where Triton is absent or the group size has no K tile (not a multiple of 16). The layer
keeps the names qweight / scales / qzeros for them, in that transposed layout."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.reference import weight_only_quant_matmul
from tokenmill.quant.linear_method import set_kernel_tensors


def prepare_cuda(layer: nn.Module, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None) -> None:
    set_kernel_tensors(layer, qweight=qweight.t().contiguous(), scales=scales.float().t().contiguous(),
                       qzeros=None if qzeros is None else qzeros.float().t().contiguous())


def cuda_matmul(layer: nn.Module, x: torch.Tensor, bits: int, group_size: int | None, use_triton: bool) -> torch.Tensor:
    if use_triton:
        from tokenmill.kernels.triton_quant_matmul import block_k_for, quant_matmul

        if block_k_for(group_size) is not None:
            return quant_matmul(x, layer.qweight, layer.scales, layer.qzeros, bits, group_size, layer.input_size)
    return weight_only_quant_matmul(x, layer.qweight, layer.scales, layer.qzeros, bits)
