"""On a CUDA machine: each method's GPU path (Triton W8A16 / W4A16 / W2A16, fp8 through torch._scaled_mm where
the GPU has fp8 tensor cores) against x @ dequantize(...).T, at GEMV and GEMM row counts. Skipped without a
GPU; the same kernels are checked on CPU under the interpreter (test_triton_quant_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.linear import MergedLinear
from tokenmill.platform import fp8_matmul_available, triton_available
from tokenmill.quant.codes import QuantSpec, dequantize, quantize_rtn
from tokenmill.quant.methods import make_quant_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPECS = [QuantSpec("int8"), QuantSpec("int8", 32), QuantSpec("int4", 128, True), QuantSpec("int4", 32),
         QuantSpec("w2", 64, True), QuantSpec("fp8")]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_path_equals_the_dequantized_matmul(spec: QuantSpec, dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    method = make_quant_method(spec, quantize_on_load=False, use_triton=triton_available(),
                               fp8_scaled_mm=fp8_matmul_available(device))
    layer = MergedLinear(512, [256, 128], ["gate", "up"], False, dtype, device, method)
    generator = torch.Generator().manual_seed(0)
    parts = {name: quantize_rtn(spec, torch.randn(rows, 512, generator=generator) * 0.05)
             for name, rows in (("gate", 256), ("up", 128))}
    for index, name in enumerate(("qweight", "scales", "qzeros")):
        if parts["gate"][index] is not None:
            param = getattr(layer, name)
            for shard, tensors in parts.items():
                param.weight_loader(param, tensors[index], shard)
    method.process_weights_after_loading(layer)
    weight = torch.cat([dequantize(spec, *tensors) for tensors in parts.values()]).to(device)
    # fp8 through _scaled_mm quantizes the activations to fp8 as well (3 mantissa bits).
    tolerance = 1e-4 if dtype == torch.float32 else 6e-2 if spec.method == "fp8" else 1e-2
    for rows in (1, 5, 64, 300):
        x = torch.randn(rows, 512, generator=generator).to(device=device, dtype=dtype)
        reference = x.float() @ weight.T
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, 384)
        error = (got.float() - reference).abs().max().item() / reference.abs().max().item()
        assert error <= tolerance, (spec, rows, error)
