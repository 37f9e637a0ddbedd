"""The batched LoRA kernel (triton_lora.py) against its torch twin, as checks.py's KernelCases: small shapes for
the interpreter, Llama-3-8B's fused q/k/v and gate/up shapes for a GPU.

Inputs are random normals; token slots mix every resident slot with base-model tokens (-1), in a random
order, so a kernel that ignores a token's slot, a slice's offset or the base marker shows. Building the cases
imports no Triton.
"""

from __future__ import annotations

import torch

from tokenmill.kernels import reference
from tokenmill.kernels.checks import TOLERANCE, KernelCase


def _lora_case(tokens: int, in_features: int, slice_sizes: list[int], slots: int, rank: int, dtype: torch.dtype,
               device: torch.device, seed: int) -> KernelCase:
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels.triton_lora import lora_shrink_expand

        generator = torch.Generator().manual_seed(seed)
        offsets = [sum(slice_sizes[:i]) for i in range(len(slice_sizes))]
        x = torch.randn(tokens, in_features, generator=generator).to(dtype)
        lora_a = (torch.randn(slots, len(slice_sizes), rank, in_features, generator=generator)
                  / in_features ** 0.5).to(dtype)
        lora_b = torch.randn(slots, len(slice_sizes), rank, max(slice_sizes), generator=generator).to(dtype)
        y = torch.randn(tokens, sum(slice_sizes), generator=generator).to(dtype)
        token_slots = torch.randint(-1, slots, (tokens,), generator=generator)
        token_slots[: slots + 1] = torch.arange(-1, slots)[: tokens]  # every slot and the base model appear
        token_slots = token_slots[torch.randperm(tokens, generator=generator)]
        slices = list(zip(offsets, slice_sizes))
        x, lora_a, lora_b, y, token_slots = (t.to(device) for t in (x, lora_a, lora_b, y, token_slots))
        got = lora_shrink_expand(y.clone(), x, lora_a, lora_b, token_slots, slices)
        return got, reference.lora_shrink_expand(y.clone(), x, lora_a, lora_b, token_slots, slices)

    sizes = "+".join(map(str, slice_sizes))
    name = f"lora t{tokens} in{in_features} out{sizes} slots{slots} r{rank} {str(dtype).removeprefix('torch.')}"
    return KernelCase(name, TOLERANCE[dtype], compute)


def lora_kernel_cases(full: bool, device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    """Small: q/k/v with GQA slices of unequal width, gate/up, a plain projection, ranks that are not powers of
    two. Full: Llama-3-8B's q/k/v (4096 -> 4096+1024+1024) and gate/up (4096 -> 2 x 14336) at decode batch 32
    and a 512-token prefill chunk, 8 resident adapters of rank 16."""
    if full:
        return [_lora_case(tokens, 4096, sizes, 8, 16, dtype, device, 2000 + index)
                for index, (tokens, sizes) in enumerate([(32, [4096, 1024, 1024]), (512, [4096, 1024, 1024]),
                                                         (32, [14336, 14336]), (512, [14336, 14336])])]
    return [
        _lora_case(9, 64, [48, 16, 16], 3, 8, dtype, device, 1),
        _lora_case(5, 40, [24, 24], 2, 5, dtype, device, 2),
        _lora_case(12, 96, [72], 4, 16, dtype, device, 3),
        _lora_case(3, 33, [20, 10, 10], 1, 3, dtype, device, 4),
    ]
