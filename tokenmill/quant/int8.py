"""int8 weight-only (w8a16): int8 codes with one scale per output channel, or per group of columns (GGUF's
Q8_0 is int8 in groups of 32)."""

from __future__ import annotations

import torch

from tokenmill.layers.linear import LinearBase
from tokenmill.quant.cpu_kernels import int8pack_matmul, tiled_dequant_matmul
from tokenmill.quant.gpu_matmul import cuda_matmul, prepare_cuda
from tokenmill.quant.linear_method import QuantizedLinearMethod, set_buffers

# Rows up to which the CPU runs aten's int8 kernel; above, the tiled dequantize-then-matmul. The int8 kernel
# reads the codes directly, which is what a decode step (a few rows) is bound by; with many rows the matmul
# itself dominates and MKL's float GEMM on a dequantized slab does it faster than the int8 kernel's inner
# loop. `benchmarks/quant_kernels.py` measures both at batch 1 and 32.
INT8PACK_MAX_ROWS = 16


class Int8LinearMethod(QuantizedLinearMethod):
    def prepare(self, layer: LinearBase, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor | None) -> None:
        if qweight.device.type == "cuda":
            prepare_cuda(layer, qweight, scales, None)
            return
        set_buffers(layer, qweight=qweight.contiguous(), scales=scales.float().contiguous())
        if self.spec.group_size is None:  # the int8 kernel's per-channel scales, in the activations' dtype
            set_buffers(layer, channel_scales=scales[:, 0].to(layer.compute_dtype).contiguous())

    def matmul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            return cuda_matmul(layer, x, 8, self.spec.group_size, self.use_triton)
        if self.spec.group_size is None and x.shape[0] <= INT8PACK_MAX_ROWS:
            return int8pack_matmul(x, layer.qweight, layer.channel_scales)
        return tiled_dequant_matmul(x, layer.qweight, layer.scales, None, 8)
