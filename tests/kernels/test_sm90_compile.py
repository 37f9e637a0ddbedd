"""Every Triton kernel compiles for Hopper (sm_90) on this CPU-only machine, through Triton's own compiler and
the ptxas its wheel carries, at the block sizes and warps its launcher picks, and its shared memory fits an
H100/H200 (227 KiB per block)."""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels would load as interpreted functions
    pytest.skip("compiling for sm_90 needs Triton's compiler; this process runs the interpreter",
                allow_module_level=True)
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from triton.backends.compiler import GPUTarget  # noqa: E402

from tokenmill.kernels import (  # noqa: E402
    triton_activation,
    triton_decode_attention,
    triton_kv_store,
    triton_norm,
    triton_rotary,
    triton_varlen_attention,
)

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_BYTES = 232448  # 227 KiB: the most one block may use on an H100/H200
INDEX_POINTERS = {"block_tables_ptr", "seq_lens_ptr", "query_start_ptr", "slot_ptr"}
INT32_POINTERS = {"work_ptr"}
FLOAT32_POINTERS = {"part_out_ptr", "part_lse_ptr"}
FLOAT_ARGS = {"scale", "softcap", "eps"}
TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def signature(kernel: Any, dtype: torch.dtype, constexprs: dict[str, Any]) -> dict[str, str]:
    """Argument types by naming convention: *_ptr are pointers (indices int64, the varlen work list int32,
    split-KV partials float32, the rest the model dtype), scale/softcap/eps float32, other arguments int32."""
    types = {}
    for param in kernel.params:
        name = param.name
        if name in constexprs:
            types[name] = "constexpr"
        elif name in INDEX_POINTERS:
            types[name] = "*i64"
        elif name in INT32_POINTERS:
            types[name] = "*i32"
        elif name in FLOAT32_POINTERS:
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*" + TRITON_DTYPE[dtype]
        else:
            types[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return types


def compile_for_hopper(kernel: Any, dtype: torch.dtype, config: dict[str, Any]) -> Any:
    constexprs = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    options = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options=options)


def _attention_cases() -> list[tuple[str, Any, torch.dtype, dict[str, Any]]]:
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = []
    # (query heads per KV head, head_dim, dtype, split/window/softcap on): Llama-3-8B and Qwen3-0.6B heads in
    # bfloat16, Gemma 2's 256-wide heads, a small model, and float32 where tiles take the most shared memory.
    for group, head_dim, dtype, extras in ((4, 128, bf16, False), (4, 128, bf16, True), (2, 128, bf16, True),
                                           (2, 256, bf16, True), (1, 64, bf16, False), (4, 128, fp32, True),
                                           (2, 256, fp32, True)):
        config = triton_decode_attention.launch_config(group, head_dim, dtype)
        config.update(USE_SOFTCAP=extras, USE_WINDOW=extras, SPLIT=extras)
        cases.append((f"decode g{group} d{head_dim} {dtype} split={extras}",
                      triton_decode_attention.decode_partition_kernel, dtype, config))
    for group, head_dim, dtype, extras in ((4, 128, bf16, False), (2, 256, bf16, True), (1, 64, bf16, False),
                                           (4, 128, fp32, True), (2, 256, fp32, True)):
        config = triton_varlen_attention.launch_config(group, head_dim, dtype)
        config.update(USE_SOFTCAP=extras, USE_WINDOW=extras)
        cases.append((f"varlen g{group} d{head_dim} {dtype} window/softcap={extras}",
                      triton_varlen_attention.varlen_attention_kernel, dtype, config))
    for head_dim, partitions in ((128, triton_decode_attention.MAX_PARTITIONS), (256, 3)):
        cases.append((f"merge d{head_dim} p{partitions}", triton_decode_attention.merge_partitions_kernel,
                      torch.bfloat16, triton_decode_attention.merge_config(head_dim, partitions)))
    return cases


def _layer_cases() -> list[tuple[str, Any, torch.dtype, dict[str, Any]]]:
    bf16 = torch.bfloat16
    cases = [
        ("kv_store kvh8 d128", triton_kv_store.kv_store_kernel, bf16, triton_kv_store.launch_config(8, 128)),
        ("kv_store kvh1 d256", triton_kv_store.kv_store_kernel, bf16, triton_kv_store.launch_config(1, 256)),
        ("rotary h40 d128", triton_rotary.rotary_kernel, bf16, triton_rotary.launch_config(40, 128, 128)),
        ("rotary partial h32 d128", triton_rotary.rotary_kernel, bf16, triton_rotary.launch_config(32, 128, 96)),
        ("silu_and_mul i14336", triton_activation.act_and_mul_kernel, bf16,
         dict(triton_activation.launch_config(14336), ACTIVATION=triton_activation.SILU)),
        ("gelu_tanh_and_mul i9216", triton_activation.act_and_mul_kernel, bf16,
         dict(triton_activation.launch_config(9216), ACTIVATION=triton_activation.GELU_TANH)),
    ]
    for hidden, residual, offset in ((4096, True, False), (8192, False, False), (2304, True, True)):
        cases.append((f"rms_norm h{hidden} residual={residual} offset={offset}", triton_norm.rms_norm_kernel, bf16,
                      dict(triton_norm.launch_config(hidden), HAS_RESIDUAL=residual, OFFSET=offset)))
    return cases


CASES = _attention_cases() + _layer_cases()


@pytest.mark.parametrize("name,kernel,dtype,config", CASES, ids=[case[0] for case in CASES])
def test_kernel_compiles_for_hopper_and_fits_its_shared_memory(name, kernel, dtype, config) -> None:
    compiled = compile_for_hopper(kernel, dtype, config)
    assert compiled.asm.get("cubin"), f"{name}: no cubin"
    assert ".target sm_90" in compiled.asm["ptx"], f"{name}: not built for sm_90"
    assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"{name}: {compiled.metadata.shared} bytes of shared memory"
