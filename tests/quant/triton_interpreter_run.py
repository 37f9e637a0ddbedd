"""Run under TRITON_INTERPRET=1 (in its own process, set before triton is imported): every Triton quantized
matmul against its torch twin on random inputs; exits non-zero naming the first case that differs. (Under the
interpreter the GEMM's bfloat16 dot operands are widened to float32, kernels/triton_attention_common.mma.)"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting this process"

import torch  # noqa: E402

from tokenmill.kernels.quant_checks import quant_kernel_cases  # noqa: E402
from tokenmill.kernels.reference import weight_only_quant_matmul  # noqa: E402
from tokenmill.kernels.triton_quant_matmul import GEMV_MAX_ROWS, quant_matmul  # noqa: E402
from tokenmill.quant.codes import QuantSpec, dequantize, quantize_rtn  # noqa: E402
from tokenmill.quant.gpu_matmul import cuda_matmul, prepare_cuda  # noqa: E402

# (spec, M, N, K): GEMV and GEMM row counts, N off the block size, K tiles of 64 / 32 / 16.
CASES = [
    (QuantSpec("int8"), 1, 40, 96), (QuantSpec("int8"), 33, 72, 160), (QuantSpec("int8", 32), 4, 24, 64),
    (QuantSpec("int8", 32), 17, 24, 64), (QuantSpec("int4", 32, True), 3, 130, 128),
    (QuantSpec("int4", 128), GEMV_MAX_ROWS, 64, 256), (QuantSpec("int4", 64, True), 70, 48, 192),
    (QuantSpec("int4", 48, True), 2, 32, 96), (QuantSpec("w2", 64, True), 1, 100, 256),
    (QuantSpec("w2", 32, True), 20, 48, 128),
]


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    for spec, m, n, k in CASES:
        qweight, scales, qzeros = quantize_rtn(spec, torch.randn(n, k, generator=generator))
        q_kn, s_gn = qweight.t().contiguous(), scales.t().contiguous()
        z_gn = None if qzeros is None else qzeros.t().contiguous()
        # bfloat16: the output's rounding (the GEMM's store; an ulp is 2^-8) and the activations' dominate.
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            x = torch.randn(m, k, generator=generator).to(dtype)
            got = quant_matmul(x, q_kn, s_gn, z_gn, spec.bits, spec.group_size, k)
            want = weight_only_quant_matmul(x, q_kn, s_gn, z_gn, spec.bits)
            error = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
            if got.dtype != dtype or got.shape != (m, n) or not error <= tolerance:
                sys.exit(f"{spec} M={m} N={n} K={k} {dtype}: relative error {error:.3g} > {tolerance}")
    print(f"{len(CASES) * 2} cases agree")
    _check_method_wiring(generator)
    _check_device_check_cases()


def _check_device_check_cases() -> None:
    """The small quantized-matmul cases of the device check's kernel section (kernels/quant_checks.py)."""
    for dtype in (torch.float32, torch.bfloat16):
        for case in quant_kernel_cases(full=False, device=torch.device("cpu"), dtype=dtype):
            result = case.run()
            if not result["ok"]:
                sys.exit(f"device check case {case.name}: {result}")
    print("device check cases agree")


def _check_method_wiring(generator: torch.Generator) -> None:
    """The methods' CUDA path end to end on canonical tensors (prepare_cuda's transposes, then the kernels):
    it equals x @ dequantize(...).T; the interpreter runs it on CPU tensors."""
    for spec in (QuantSpec("int8"), QuantSpec("int4", 64, True), QuantSpec("w2", 32, True)):
        weight = torch.randn(48, 128, generator=generator)
        canonical = quantize_rtn(spec, weight)
        layer = torch.nn.Module()
        layer.input_size = 128
        prepare_cuda(layer, *canonical)
        for rows in (2, 40):
            x = torch.randn(rows, 128, generator=generator)
            got = cuda_matmul(layer, x, spec.bits, spec.group_size, use_triton=True)
            want = x @ dequantize(spec, *canonical).T
            error = (got - want).abs().max().item() / want.abs().max().item()
            if not error <= 1e-5:
                sys.exit(f"{spec} through prepare_cuda / cuda_matmul, {rows} rows: relative error {error:.3g}")
    print("method wiring agrees")


if __name__ == "__main__":
    main()
