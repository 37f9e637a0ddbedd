"""The Triton W8A16 / W4A16 / W2A16 kernels without a GPU: under the Triton interpreter against their torch
twin (tests/quant/triton_interpreter_run.py, in its own process), and compiled for Hopper (sm_90)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # the tests extra brings it; the engine imports it only on CUDA

ROOT = Path(__file__).resolve().parents[2]
HOPPER_SHARED_MEMORY = 232448  # bytes a block may use on sm_90


def test_kernels_equal_their_twin_under_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "tests.quant.triton_interpreter_run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cases agree" in result.stdout and "method wiring agrees" in result.stdout
    assert "device check cases agree" in result.stdout


def _signature(kernel, act: str, bits: int) -> dict[str, str]:  # noqa: ANN001
    constexprs = {"BITS", "GROUP", "HAS_ZEROS", "BLOCK_M", "BLOCK_N", "BLOCK_K"}
    types = {"x_ptr": f"*{act}", "q_ptr": "*i8" if bits == 8 else "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32",
             "partial_ptr": "*fp32", "out_ptr": f"*{act}"}
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="compiling for sm_90 needs Triton's compiler; this process runs the interpreter")
@pytest.mark.parametrize(("kind", "act", "bits", "group", "rows"), [
    ("gemv", "bf16", 8, 0, 1), ("gemv", "bf16", 4, 128, 8), ("gemv", "fp16", 2, 64, 4), ("gemv", "fp32", 4, 32, 2),
    ("gemm", "bf16", 8, 0, 64), ("gemm", "bf16", 4, 128, 64), ("gemm", "bf16", 2, 64, 64), ("gemm", "fp32", 4, 32, 64),
])
def test_kernels_compile_for_hopper(kind: str, act: str, bits: int, group: int, rows: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tokenmill.kernels.triton_quant_matmul import block_k_for, gemv_blocks, quant_gemm_kernel, quant_gemv_kernel

    block_k = block_k_for(group or None)
    if kind == "gemv":
        kernel = quant_gemv_kernel
        block_m, block_n, block_k = gemv_blocks(rows, block_k)
        constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    else:
        kernel = quant_gemm_kernel
        constexprs = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": block_k}
    constexprs.update(BITS=bits, GROUP=group, HAS_ZEROS=bits < 8)
    source = ASTSource(fn=kernel, signature=_signature(kernel, act, bits), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert len(compiled.asm["cubin"]) > 0
    assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY
