"""Every Triton kernel against its torch twin on random inputs: the cases the interpreter tests run at small
shapes on the CPU and the device check runs at full shapes (Llama-3-8B and Qwen3-0.6B head counts, long
contexts) on a GPU.

    for case in kernel_cases(full=False, device=torch.device("cpu"), dtype=torch.float32):
        result = case.run()   # {"name", "max_abs_err", "max_rel_err", "tolerance", "ok"}

Inputs are random normals (never zeros), block tables random permutations of the pool, so a kernel that
ignores the table, a mask or a stride shows. Building the cases imports no Triton; running one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.kernels import reference

# Relative error allowed: the largest absolute difference over the twin's largest magnitude. In 16-bit
# types a kernel that rounds once where its twin rounds between ops (or sums in another order) may land two
# units in the last place away: 2 * 2**-7 of a value at the bottom of its binade for bfloat16.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


@dataclass
class KernelCase:
    name: str
    tolerance: float
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (kernel output, twin output)

    def run(self) -> dict[str, object]:
        got, want = self.compute()
        if got.shape != want.shape:
            return {"name": self.name, "ok": False, "error": f"shape {tuple(got.shape)} != {tuple(want.shape)}"}
        got, want = got.float(), want.float()
        max_abs = (got - want).abs().max().item() if want.numel() else 0.0
        scale = want.abs().max().item() if want.numel() else 1.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        ok = bool(torch.isfinite(got).all().item()) and max_rel <= self.tolerance
        return {"name": self.name, "max_abs_err": max_abs, "max_rel_err": max_rel, "tolerance": self.tolerance,
                "ok": ok}


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed, device), device=device, dtype=torch.float32).to(dtype)


def _paged(seq_lens: list[int], shape: AttentionShape, dtype: torch.dtype, device: torch.device,
           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache and block tables that scatter every sequence over a random permutation of the pool."""
    blocks_per_seq = [-(-n // shape.block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks hold garbage that must never be read
    cache = _randn((2, num_blocks, shape.block_size, shape.kv_heads, shape.head_dim), dtype, device, seed)
    order = torch.randperm(num_blocks, generator=_generator(seed + 1, torch.device("cpu"))).tolist()
    tables = torch.zeros((len(seq_lens), max(blocks_per_seq)), dtype=torch.int64)
    taken = 0
    for row, count in enumerate(blocks_per_seq):
        tables[row, :count] = torch.tensor(order[taken : taken + count])
        taken += count
    return cache, tables.to(device)


def _decode_case(shape: AttentionShape, seq_lens: list[int], partitions: int | None, window: int | None,
                 softcap: float | None, dtype: torch.dtype, device: torch.device, seed: int) -> KernelCase:
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels import triton_decode_attention as kernel

        cache, tables = _paged(seq_lens, shape, dtype, device, seed)
        query = _randn((len(seq_lens), shape.heads, shape.head_dim), dtype, device, seed + 2)
        lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
        scale = shape.head_dim ** -0.5
        parts = partitions or kernel.num_partitions_for(len(seq_lens), shape.kv_heads, max(seq_lens))
        got = kernel.paged_decode_attention(query, cache, tables, lens, scale, window, softcap, parts)
        return got, reference.paged_decode_attention(query, cache, tables, lens, scale, window, softcap)

    name = (f"decode h{shape.heads}/{shape.kv_heads} d{shape.head_dim} bs{shape.block_size} "
            f"lens{_lens_label(seq_lens)} parts{partitions or 'auto'} win{window} cap{softcap} {_dtype_name(dtype)}")
    return KernelCase(name, TOLERANCE[dtype], compute)


def _varlen_case(shape: AttentionShape, query_lens: list[int], seq_lens: list[int], window: int | None,
                 softcap: float | None, dtype: torch.dtype, device: torch.device, seed: int) -> KernelCase:
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels import triton_varlen_attention as kernel

        cache, tables = _paged(seq_lens, shape, dtype, device, seed)
        query = _randn((sum(query_lens), shape.heads, shape.head_dim), dtype, device, seed + 2)
        lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
        starts = torch.tensor([0] + query_lens, dtype=torch.int64, device=device).cumsum(0)
        scale = shape.head_dim ** -0.5
        work = kernel.work_items(np.array(query_lens), shape.heads // shape.kv_heads, shape.head_dim, dtype, device)
        got = kernel.paged_varlen_attention(query, cache, tables, lens, starts, work, scale, window, softcap)
        return got, reference.paged_varlen_attention(query, cache, tables, lens, starts, scale, window, softcap)

    name = (f"varlen h{shape.heads}/{shape.kv_heads} d{shape.head_dim} bs{shape.block_size} "
            f"q{_lens_label(query_lens)} lens{_lens_label(seq_lens)} win{window} cap{softcap} {_dtype_name(dtype)}")
    return KernelCase(name, TOLERANCE[dtype], compute)


def _kv_store_case(num_tokens: int, shape: AttentionShape, dtype: torch.dtype, device: torch.device,
                   seed: int) -> KernelCase:
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels import triton_kv_store as kernel

        cache = _randn((2, -(-num_tokens // shape.block_size) + 2, shape.block_size, shape.kv_heads,
                        shape.head_dim), dtype, device, seed)
        twin_cache = cache.clone()
        # Keys as a strided view of a fused projection, as the model hands them over.
        fused = _randn((num_tokens, 2 * shape.kv_heads + 1, shape.head_dim), dtype, device, seed + 1)
        key, value = fused[:, : shape.kv_heads], fused[:, shape.kv_heads : 2 * shape.kv_heads]
        slots = torch.randperm(cache.shape[1] * shape.block_size, generator=_generator(seed, torch.device("cpu")))
        slots = slots[:num_tokens].to(device)
        kernel.store_kv(key, value, cache, slots)
        reference.store_kv(key, value, twin_cache, slots)
        return cache, twin_cache

    name = f"kv_store t{num_tokens} kvh{shape.kv_heads} d{shape.head_dim} bs{shape.block_size} {_dtype_name(dtype)}"
    return KernelCase(name, TOLERANCE[dtype], compute)


def _norm_case(rows: int, hidden: int, residual: bool, offset: bool, dtype: torch.dtype, device: torch.device,
               seed: int) -> KernelCase:
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels import triton_norm as kernel

        x = _randn((rows, hidden), dtype, device, seed)
        res = _randn((rows, hidden), dtype, device, seed + 1) if residual else None
        weight = (_randn((hidden,), torch.float32, device, seed + 2) * 0.5 + (0.0 if offset else 1.0)).to(dtype)
        got, got_sum = kernel.fused_rms_norm(x, res, weight, 1e-6, offset)
        if res is None:
            want = (reference.offset_rms_norm if offset else reference.rms_norm)(x, weight, 1e-6)
            return got, want
        want, want_sum = (reference.add_offset_rms_norm if offset else reference.add_rms_norm)(x, res, weight, 1e-6)
        return torch.cat((got, got_sum)), torch.cat((want, want_sum))

    name = f"rms_norm r{rows} h{hidden} residual={residual} offset={offset} {_dtype_name(dtype)}"
    return KernelCase(name, TOLERANCE[dtype], compute)


def _rotary_case(num_tokens: int, heads: int, head_dim: int, rotary_dim: int, scaled: bool, dtype: torch.dtype,
                 device: torch.device, seed: int) -> KernelCase:
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels import triton_rotary as kernel

        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        if scaled:  # a Llama-3-like table: low frequencies slowed down; the kernel only sees the table
            inv_freq = torch.where(inv_freq < 1e-2, inv_freq / 8.0, inv_freq)
        table = reference.rotary_cos_sin_cache(inv_freq.to(device), 4096, dtype)
        positions = torch.randint(0, 4096, (num_tokens,), generator=_generator(seed, torch.device("cpu")))
        rows = table[positions.to(device)]
        cos, sin = rows[:, 0:1], rows[:, 1:2]
        x = _randn((num_tokens, heads, head_dim), dtype, device, seed + 1)
        return kernel.apply_rotary(x, cos, sin), reference.apply_rotary(x, cos, sin)

    name = f"rotary t{num_tokens} h{heads} d{head_dim} rot{rotary_dim} scaled={scaled} {_dtype_name(dtype)}"
    return KernelCase(name, TOLERANCE[dtype], compute)


def _activation_case(rows: int, intermediate: int, gelu: bool, dtype: torch.dtype, device: torch.device,
                     seed: int) -> KernelCase:
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from tokenmill.kernels import triton_activation as kernel

        gate_up = _randn((rows, 2 * intermediate), dtype, device, seed) * 3
        if gelu:
            return kernel.gelu_tanh_and_mul(gate_up), reference.gelu_tanh_and_mul(gate_up)
        return kernel.silu_and_mul(gate_up), reference.silu_and_mul(gate_up)

    name = f"{'gelu_tanh' if gelu else 'silu'}_and_mul r{rows} i{intermediate} {_dtype_name(dtype)}"
    return KernelCase(name, TOLERANCE[dtype], compute)


def _lens_label(lens: list[int]) -> str:
    return ",".join(map(str, lens)) if len(lens) <= 4 else f"{len(lens)}x<={max(lens)}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_cases(full: bool, device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    """Small shapes (the interpreter, many variants) or full ones (a GPU: real head counts, long contexts)."""
    if full:
        return _full_cases(device, dtype)
    small = AttentionShape(heads=4, kv_heads=2, head_dim=16, block_size=16)
    odd = AttentionShape(heads=6, kv_heads=2, head_dim=24, block_size=24)  # group 3, head_dim and block not 2^n
    mha = AttentionShape(heads=2, kv_heads=2, head_dim=32, block_size=32)
    llama8b = AttentionShape(heads=32, kv_heads=8, head_dim=128, block_size=16)
    return [
        _kv_store_case(37, small, dtype, device, 1),
        _kv_store_case(11, odd, dtype, device, 2),
        _norm_case(5, 64, False, False, dtype, device, 3),
        _norm_case(3, 96, True, False, dtype, device, 4),
        _norm_case(4, 48, True, True, dtype, device, 5),
        _norm_case(2, 40, False, True, dtype, device, 6),
        _rotary_case(7, 4, 16, 16, False, dtype, device, 7),
        _rotary_case(5, 3, 24, 24, True, dtype, device, 8),
        _rotary_case(4, 2, 32, 16, False, dtype, device, 9),  # partial rotary
        _activation_case(3, 40, False, dtype, device, 10),
        _activation_case(2, 24, True, dtype, device, 11),
        _decode_case(small, [1, 17, 40], 1, None, None, dtype, device, 12),
        _decode_case(small, [70, 5, 33], 3, None, None, dtype, device, 13),  # split, one partition empty
        _decode_case(odd, [50, 100], 2, None, None, dtype, device, 14),
        _decode_case(mha, [90], 4, 40, None, dtype, device, 15),  # sliding window
        _decode_case(small, [30, 65], 2, None, 5.0, dtype, device, 16),  # soft-capped
        _varlen_case(small, [20, 1, 5], [20, 33, 40], None, None, dtype, device, 17),  # fresh, decode, verify
        _varlen_case(odd, [30, 9], [70, 9], None, None, dtype, device, 18),  # a prefix hit, a fresh chunk
        _varlen_case(mha, [40, 3], [75, 50], 16, None, dtype, device, 19),  # sliding window
        _varlen_case(small, [12, 4], [12, 36], 10, 5.0, dtype, device, 20),  # window and soft cap
        _decode_case(llama8b, [40, 7], 2, None, None, dtype, device, 21),  # Llama-3-8B's heads, short contexts
        _varlen_case(llama8b, [9, 1], [20, 30], None, None, dtype, device, 22),
    ]


def _full_cases(device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    """Every shape in 16-bit types; float32 (a parity check: each kernel's full-precision path compiles and
    agrees) keeps one case per kernel and code path, so the two dtypes' compiles fit the device check's time."""
    llama8b = AttentionShape(heads=32, kv_heads=8, head_dim=128, block_size=16)
    qwen06b = AttentionShape(heads=16, kv_heads=8, head_dim=128, block_size=16)
    gemma = AttentionShape(heads=8, kv_heads=4, head_dim=256, block_size=32)
    cases = [  # (case, also in float32)
        (_kv_store_case(4096, llama8b, dtype, device, 1), True),
        (_norm_case(512, 4096, True, False, dtype, device, 2), True),
        (_norm_case(512, 1024, True, False, dtype, device, 3), False),
        (_norm_case(64, 2304, True, True, dtype, device, 4), True),
        (_rotary_case(2048, 32, 128, 128, True, dtype, device, 5), True),
        (_rotary_case(2048, 16, 128, 128, False, dtype, device, 6), False),
        (_activation_case(512, 14336, False, dtype, device, 7), True),
        (_activation_case(512, 3072, False, dtype, device, 8), False),
        (_decode_case(llama8b, [32768], None, None, None, dtype, device, 9), False),
        (_decode_case(llama8b, [8192, 100, 4000, 17], None, None, None, dtype, device, 10), True),
        (_decode_case(llama8b, [1000 + 37 * i for i in range(64)], None, None, None, dtype, device, 11), True),
        (_decode_case(qwen06b, [16384, 2048], None, None, None, dtype, device, 12), False),
        (_decode_case(gemma, [6000, 300], None, 4096, 50.0, dtype, device, 13), True),
        (_varlen_case(llama8b, [2048], [2048], None, None, dtype, device, 14), False),
        (_varlen_case(llama8b, [512, 1, 5, 300], [8192, 4000, 1030, 300], None, None, dtype, device, 15), True),
        (_varlen_case(qwen06b, [1024, 8], [4096, 20000], None, None, dtype, device, 16), False),
        (_varlen_case(gemma, [1024, 6], [5000, 700], 4096, 50.0, dtype, device, 17), True),
    ]
    return [case for case, in_fp32 in cases if dtype != torch.float32 or in_fp32]
