"""fp8 (e4m3) weights with one float32 scale per output channel.

On GPUs with fp8 tensor cores (compute capability 8.9 and up; platform.fp8_matmul_available) bfloat16
activations are quantized to fp8 per token and multiplied with `torch._scaled_mm`, which applies both
scales to its float32 accumulators (so the activations are fp8 too there: w8a8). Elsewhere the weight is
dequantized for each matmul (on the CPU a tile of columns at a time, quant/cpu_kernels.py), which keeps
memory at one byte a weight and is what the tests check exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.layers.linear import LinearBase, QuantMethod
from tokenmill.quant.codes import FP8_MAX, QuantSpec
from tokenmill.quant.cpu_kernels import tiled_dequant_matmul
from tokenmill.quant.linear_method import QuantizedLinearMethod, set_kernel_tensors


class Fp8LinearMethod(QuantizedLinearMethod):
    def __init__(self, spec: QuantSpec, *, quantize_on_load: bool, float_method: QuantMethod | None = None,
                 use_triton: bool = False, scaled_mm: bool = False) -> None:
        super().__init__(spec, quantize_on_load=quantize_on_load, float_method=float_method, use_triton=use_triton)
        self.scaled_mm = scaled_mm

    def prepare(self, layer: LinearBase, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor | None) -> None:
        set_kernel_tensors(layer, qweight=qweight.contiguous(), scales=scales.float().reshape(-1, 1).contiguous())

    def matmul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if self._use_scaled_mm(layer, x):
            # Per-token activation scales; _scaled_mm wants the weight column-major ([N, K] row-major, transposed).
            x_scales = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
            x8 = (x.float() / x_scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return torch._scaled_mm(x8, layer.qweight.t(), scale_a=x_scales, scale_b=layer.scales.view(1, -1),
                                    out_dtype=x.dtype)
        if x.device.type == "cpu":
            return tiled_dequant_matmul(x, layer.qweight, layer.scales, None, 8)
        return F.linear(x, (layer.qweight.float() * layer.scales).to(x.dtype))

    def _use_scaled_mm(self, layer: LinearBase, x: torch.Tensor) -> bool:
        # Row-wise scaled fp8 matmuls take bfloat16 outputs and widths that are multiples of 16.
        return (self.scaled_mm and x.device.type == "cuda" and x.dtype == torch.bfloat16
                and layer.input_size % 16 == 0 and layer.output_size % 16 == 0)
