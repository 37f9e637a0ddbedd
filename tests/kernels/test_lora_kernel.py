"""The batched LoRA matmul: its torch twin equals a per-token loop over each token's own adapter, the Triton
kernel (interpreted on the CPU) agrees with the twin, and the kernels compile for sm_90."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.kernels.interpreted import run_interpreted
from tokenmill.kernels import reference
from tokenmill.kernels.lora_checks import lora_kernel_cases

DTYPES = ("float32", "bfloat16")
CASES = [case.name for name in DTYPES for case in lora_kernel_cases(False, torch.device("cpu"), getattr(torch, name))]


def test_twin_applies_each_tokens_own_adapter_and_none_for_the_base() -> None:
    generator = torch.Generator().manual_seed(0)
    slices = [(0, 12), (12, 4), (16, 4)]
    x = torch.randn(7, 10, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(4, 3, 6, 10, generator=generator, dtype=torch.float64)
    lora_b = torch.randn(4, 3, 6, 12, generator=generator, dtype=torch.float64)
    slots = torch.tensor([2, -1, 0, 3, 2, 1, -1])
    y = torch.randn(7, 20, generator=generator, dtype=torch.float64)
    want = y.clone()
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for piece, (offset, size) in enumerate(slices):
            want[token, offset : offset + size] += lora_b[slot, piece, :, :size].T @ (lora_a[slot, piece] @ x[token])
    got = reference.lora_shrink_expand(y.clone(), x, lora_a, lora_b, slots, slices)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], y[1]) and torch.equal(got[6], y[6])  # base-model tokens untouched


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    pytest.importorskip("triton")
    return run_interpreted(Path(__file__).with_name("kernel_cases_script.py"), "lora", *DTYPES)


@pytest.mark.parametrize("name", CASES)
def test_kernel_agrees_with_its_twin(name: str, results: dict[str, dict]) -> None:
    assert results[name]["ok"], results[name]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiling needs Triton's compiler")
@pytest.mark.parametrize("rank,width", [(16, 14336), (64, 4096), (8, 1024)])
def test_kernels_compile_for_hopper(rank: int, width: int) -> None:
    pytest.importorskip("triton")
    import triton

    from tests.kernels.test_sm90_compile import HOPPER, HOPPER_SHARED_BYTES
    from tokenmill.kernels import triton_lora

    for kernel, config in ((triton_lora.lora_shrink_kernel, triton_lora.shrink_config(rank, 4096)),
                           (triton_lora.lora_expand_kernel, triton_lora.expand_config(rank, width))):
        constexprs = {k: v for k, v in config.items() if k != "num_warps"}
        # Slots and the slice table are int64 tensors; every other pointer holds bfloat16, the rest are int32.
        signature = {p.name: "constexpr" if p.name in constexprs else "*i64" if p.name in ("slots_ptr", "slices_ptr")
                     else "*bf16" if p.name.endswith("_ptr") else "i32" for p in kernel.params}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=HOPPER, options={"num_warps": config["num_warps"]})
        assert ".target sm_90" in compiled.asm["ptx"]
        assert compiled.metadata.shared <= HOPPER_SHARED_BYTES
