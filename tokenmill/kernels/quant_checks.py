"""The quantized matmul kernels (triton_quant_matmul.py) against their torch twin, as checks.py's KernelCases:
small shapes for the interpreter, Llama-3-8B's projection shapes for a GPU (the device check's kernel section).

Inputs are random: packed codes are random bytes (every byte is a valid set of 2- or 4-bit codes), int8
codes random over -128..127, scales positive, zero-points fractional. Building the cases imports no Triton.
"""

from __future__ import annotations

import torch

from tokenmill.kernels import reference
from tokenmill.kernels.checks import TOLERANCE, KernelCase

# (bits, group size or None for per-channel scales, zero-points): W8A16 per channel and in GGUF Q8_0's groups,
# W4A16 symmetric and with zero-points, W2A16.
SCHEMES = [(8, None, False), (8, 32, False), (4, 128, True), (4, 32, False), (2, 64, True)]
FULL_SCHEMES = [(8, None, False), (8, 32, False), (4, 128, True), (2, 64, True)]


def _quant_case(rows: int, out_features: int, in_features: int, bits: int, group: int | None, zeros: bool,
                dtype: torch.dtype, device: torch.device, seed: int) -> KernelCase:
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels.triton_quant_matmul import quant_matmul

        generator = torch.Generator().manual_seed(seed)
        per_byte = 8 // bits
        if bits == 8:
            codes = torch.randint(-128, 128, (in_features, out_features), generator=generator).to(torch.int8)
        else:
            codes = torch.randint(0, 256, (in_features // per_byte, out_features), generator=generator)
            codes = codes.to(torch.uint8)
        groups = 1 if group is None else in_features // group
        scales = (torch.rand(groups, out_features, generator=generator) + 0.5) / (1 << bits)
        qzeros = torch.rand(groups, out_features, generator=generator) * ((1 << bits) - 1) if zeros else None
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        codes, scales, x = codes.to(device), scales.to(device), x.to(device)
        qzeros = None if qzeros is None else qzeros.to(device)
        got = quant_matmul(x, codes, scales, qzeros, bits, group, in_features)
        return got, reference.weight_only_quant_matmul(x, codes, scales, qzeros, bits)

    scheme = f"w{bits}a16 {'per-channel' if group is None else f'g{group}'}{' zp' if zeros else ''}"
    name = f"quant_matmul {scheme} M={rows} N={out_features} K={in_features} {str(dtype).removeprefix('torch.')}"
    return KernelCase(name, TOLERANCE[dtype], compute)


def quant_kernel_cases(full: bool, device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    """GEMV (up to 8 rows) and GEMM row counts for every scheme; full: Llama-3-8B's q/o (4096 x 4096) and
    down (4096 x 14336) projections at batch 1, 8 and a 200-token prefill chunk."""
    if full:
        shapes, row_counts, schemes = [(4096, 4096), (4096, 14336)], [1, 8, 200], FULL_SCHEMES
    else:
        shapes, row_counts, schemes = [(72, 256), (40, 128)], [1, 3, 20], SCHEMES
    cases = []
    for index, (bits, group, zeros) in enumerate(schemes):
        for out_features, in_features in shapes:
            for rows in row_counts:
                seed = 1000 + 100 * index + rows
                cases.append(_quant_case(rows, out_features, in_features, bits, group, zeros, dtype, device, seed))
    return cases
