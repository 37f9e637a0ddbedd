"""int8 weight-only (w8a16): int8 codes with one scale per output channel, or per group of columns (GGUF's
Q8_0 is int8 in groups of 32)."""

from __future__ import annotations

import torch

from tokenmill.layers.linear import LinearBase
from tokenmill.quant.cpu_kernels import (int8_activation_mode, int8_bf16_gemm, int8_channel_kernel, int8pack_matmul,
                                         tiled_dequant_matmul)
from tokenmill.quant.gpu_matmul import cuda_matmul, prepare_cuda
from tokenmill.quant.linear_method import QuantizedLinearMethod, set_kernel_tensors


class Int8LinearMethod(QuantizedLinearMethod):
    def prepare(self, layer: LinearBase, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor | None) -> None:
        if qweight.device.type == "cuda":
            prepare_cuda(layer, qweight, scales, None)
            return
        if self.spec.group_size is None:  # aten's int8 kernel takes per-channel scales in the activations' dtype
            set_kernel_tensors(layer, qweight=qweight.contiguous(),
                               scales=scales[:, 0].to(layer.compute_dtype).contiguous())
            layer.int8_mode = int8_activation_mode(layer.compute_dtype, self.native_bf16)
        else:
            set_kernel_tensors(layer, qweight=qweight.contiguous(), scales=scales.float().contiguous())

    def matmul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            return cuda_matmul(layer, x, 8, self.spec.group_size, self.use_triton)
        # aten's int8 kernel reads the codes directly (a decode step is bound by weight bytes); from a few rows
        # a bfloat16 or float32 GEMM on converted slabs is faster (quant/cpu_kernels.py: int8_channel_kernel).
        if self.spec.group_size is None:
            kernel = int8_channel_kernel(x.shape[0], layer.int8_mode)
            if kernel == "bf16_gemm":
                return int8_bf16_gemm(x, layer.qweight, layer.scales)
            if kernel == "f32_slabs":
                # the same (model-dtype) scales as aten's kernel, as a column: [N] -> [N, 1] float32, N values
                return tiled_dequant_matmul(x, layer.qweight, layer.scales.float()[:, None], None, 8)
            return int8pack_matmul(x, layer.qweight, layer.scales)
        return tiled_dequant_matmul(x, layer.qweight, layer.scales, None, 8)
