"""w2 weight-only (w2a16): 2-bit codes 0..3 in groups, each group with a scale and a (possibly fractional)
zero-point, as the alternating fit of the 2-bit post-training method produces. The CPU has no packed 2-bit
kernel: the matmul unpacks one tile of whole groups at a time (quant/cpu_kernels.py)."""

from __future__ import annotations

import torch

from tokenmill.layers.linear import LinearBase
from tokenmill.quant.cpu_kernels import tiled_dequant_matmul
from tokenmill.quant.gpu_matmul import cuda_matmul, prepare_cuda
from tokenmill.quant.linear_method import QuantizedLinearMethod, set_kernel_tensors


class W2LinearMethod(QuantizedLinearMethod):
    def prepare(self, layer: LinearBase, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor | None) -> None:
        assert qzeros is not None
        if qweight.device.type == "cuda":
            prepare_cuda(layer, qweight, scales, qzeros)
            return
        set_kernel_tensors(layer, qweight=qweight.contiguous(), scales=scales.float().contiguous(),
                           qzeros=qzeros.float().contiguous())

    def matmul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            return cuda_matmul(layer, x, 2, self.spec.group_size, self.use_triton)
        return tiled_dequant_matmul(x, layer.qweight, layer.scales, layer.qzeros, 2)
