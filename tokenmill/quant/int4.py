"""int4 weight-only (w4a16): codes 0..15 in groups of 32 to 256 columns, each group with a scale and a
zero-point (the midpoint 8 for symmetric weights)."""

from __future__ import annotations

import torch

from tokenmill.layers.linear import LinearBase
from tokenmill.quant.cpu_kernels import (int4pack_matmul, int4pack_supported, int4pack_weight, packed_kernels_fit,
                                         tiled_dequant_matmul)
from tokenmill.quant.gpu_matmul import cuda_matmul, prepare_cuda
from tokenmill.quant.linear_method import QuantizedLinearMethod, set_kernel_tensors


class Int4LinearMethod(QuantizedLinearMethod):
    def prepare(self, layer: LinearBase, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor | None) -> None:
        assert qzeros is not None
        if qweight.device.type == "cuda":
            prepare_cuda(layer, qweight, scales, qzeros)
            return
        layer.int4pack = (int4pack_supported(layer.output_size, self.spec.group_size)
                          and packed_kernels_fit(layer.compute_dtype))
        if layer.int4pack:
            packed, scales_and_zeros = int4pack_weight(qweight, scales, qzeros, layer.compute_dtype)
            set_kernel_tensors(layer, qweight=packed, scales_and_zeros=scales_and_zeros)  # aten's int4 layout
        else:
            set_kernel_tensors(layer, qweight=qweight.contiguous(), scales=scales.float().contiguous(),
                               qzeros=qzeros.float().contiguous())

    def matmul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            return cuda_matmul(layer, x, 4, self.spec.group_size, self.use_triton)
        if layer.int4pack:  # at every batch size: it led the dequantized slabs up to 512 rows (quant/cpu_kernels.py)
            assert self.spec.group_size is not None
            return int4pack_matmul(x, layer.qweight, self.spec.group_size, layer.scales_and_zeros)
        return tiled_dequant_matmul(x, layer.qweight, layer.scales, layer.qzeros, 4)
