"""Triton weight-only quantized matmuls (W8A16, W4A16, W2A16): y = x @ W.T with W dequantized inside the kernel.

The kernel layout is the canonical one transposed so that output channels are contiguous (coalesced loads
along N): `qweight_kn` [K / codes_per_byte, N] (int8 codes, or uint8 bytes holding 2 or 4 codes along K,
column k at bits (k % per_byte) * bits), `scales_gn` and `zeros_gn` [groups, N] float32. Then
W[n, k] = (code[k, n] - zeros[k // group, n]) * scales[k // group, n]; the torch twin is
`reference.weight_only_quant_matmul`.

Two kernels, picked by the number of rows:
- decode (few rows): a split-K GEMV. Each program reads a [K-slice, BLOCK_N] strip of the weight once and
  reduces it against every row of x without tensor cores; the K slices give enough programs to fill the GPU
  when N alone would not. Partial sums go to a [splits, M, N] buffer summed afterwards (deterministic, unlike
  atomics, so greedy decoding is reproducible).
- prefill (many rows): a tiled GEMM with tl.dot on each [BLOCK_K, BLOCK_N] tile of centered codes in registers.

A tile never straddles a group: BLOCK_K divides the group size, so one scale row serves a tile and scales
its partial sums. Triton is
imported here only; this module is imported lazily on CUDA (and by the interpreter tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_attention_common import mma

GEMV_MAX_ROWS = 8  # above this the weight is re-read per row often enough that tensor-core tiles win
_TARGET_PROGRAMS = 264  # about two waves on a 132-SM Hopper; the GEMV splits K until it has this many


@triton.jit
def _centered_codes(q_ptr, s_ptr, z_ptr, k, rn, k0, N, K, stride_qk, stride_qn, stride_sg, stride_sn,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """(code - zero) as float32 [len(k), len(rn)] for input columns k (from k0) and output channels rn, and
    the scales [len(rn)] of their group. The scale is applied to the tile's partial sums, not to every
    weight: one multiply per output instead of per weight, and integer codes stay exact in bfloat16."""
    per_byte: tl.constexpr = 8 // BITS
    mask = (k < K)[:, None] & (rn < N)[None, :]
    q = tl.load(q_ptr + (k // per_byte)[:, None] * stride_qk + rn[None, :] * stride_qn, mask=mask, other=0)
    if BITS < 8:
        shift = ((k % per_byte) * BITS).to(tl.int32)
        codes = ((q.to(tl.int32) >> shift[:, None]) & ((1 << BITS) - 1)).to(tl.float32)
    else:
        codes = q.to(tl.float32)  # signed int8 codes
    group = 0 if GROUP == 0 else k0 // GROUP  # GROUP 0: one scale per output channel
    scales = tl.load(s_ptr + group * stride_sg + rn * stride_sn, mask=rn < N, other=0.0)
    if HAS_ZEROS:
        zeros = tl.load(z_ptr + group * stride_sg + rn * stride_sn, mask=rn < N, other=0.0)
        codes = codes - zeros[None, :]
    return codes, scales


@triton.jit
def quant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, partial_ptr, M, N, K, k_per_split,
                      stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[split, m, n] = sum over this split's K range of x[m, k] * W[n, k], for all M (<= BLOCK_M) rows
    at once: each weight tile is read once and reduced against every row (a decode batch), in registers."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(rm < M)[:, None] & (k < k_end)[None, :], other=0.0).to(tl.float32)
        codes, scales = _centered_codes(q_ptr, s_ptr, z_ptr, k, rn, k0, N, K, stride_qk, stride_qn, stride_sg,
                                        stride_sn, BITS, GROUP, HAS_ZEROS)
        acc += tl.sum(x[:, :, None] * codes[None, :, :], axis=1) * scales[None, :]
    tl.store(partial_ptr + (split * M + rm[:, None]) * N + rn[None, :], acc,
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def gemv_blocks(rows: int, block_k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the GEMV for `rows` rows: the [BLOCK_M, BLOCK_K, BLOCK_N] products stay
    at 8192 values a program (64 a thread at 4 warps), so more rows take narrower tiles. A smaller K tile
    still divides the group size (block_k is the largest of 64 / 32 / 16 that does)."""
    block_m = triton.next_power_of_2(rows)
    block_n = 128 if block_m <= 2 else 64
    return block_m, block_n, max(16, min(block_k, 8192 // (block_m * block_n)))


@triton.jit
def quant_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K,
                      stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * W[n, k], one [BLOCK_M, BLOCK_N] tile per program, float32 accumulation."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(rm < M)[:, None] & (k < K)[None, :], other=0.0)
        codes, scales = _centered_codes(q_ptr, s_ptr, z_ptr, k, rn, k0, N, K, stride_qk, stride_qn, stride_sg,
                                        stride_sn, BITS, GROUP, HAS_ZEROS)
        acc += mma(x, codes.to(x.dtype)) * scales[None, :]  # float32 activations: exact products, not TF32
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def block_k_for(group_size: int | None) -> int | None:
    """The K tile for a group size: the largest of 64/32/16 dividing it (tl.dot needs K >= 16); None when no
    tile fits (a group size that is not a multiple of 16), so the caller uses the torch twin."""
    if group_size is None:
        return 64
    return next((b for b in (64, 32, 16) if group_size % b == 0), None)


def quant_matmul(x: torch.Tensor, qweight_kn: torch.Tensor, scales_gn: torch.Tensor, zeros_gn: torch.Tensor | None,
                 bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """x [M, K] (float16 / bfloat16 / float32) -> [M, N] in x's dtype; group_size None: per-channel scales."""
    block_k = block_k_for(group_size)
    if block_k is None:
        raise ValueError(f"group size {group_size} is not a multiple of 16; use the torch twin")
    M, K = x.shape
    if K != in_features:
        raise ValueError(f"x has {K} columns, the weight {in_features}")
    N = qweight_kn.shape[1]
    group = 0 if group_size is None else group_size
    zeros = zeros_gn if zeros_gn is not None else scales_gn  # never read when HAS_ZEROS is False
    if M <= GEMV_MAX_ROWS:
        block_m, block_n, gemv_k = gemv_blocks(M, block_k)
        n_blocks = triton.cdiv(N, block_n)
        k_tiles = triton.cdiv(K, gemv_k)
        splits = max(1, min(k_tiles, triton.cdiv(_TARGET_PROGRAMS, n_blocks)))
        k_per_split = triton.cdiv(k_tiles, splits) * gemv_k  # whole tiles, so no tile straddles a group
        splits = triton.cdiv(K, k_per_split)
        partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
        quant_gemv_kernel[(n_blocks, splits)](
            x, qweight_kn, scales_gn, zeros, partial, M, N, K, k_per_split,
            x.stride(0), x.stride(1), qweight_kn.stride(0), qweight_kn.stride(1), scales_gn.stride(0),
            scales_gn.stride(1), BITS=bits, GROUP=group, HAS_ZEROS=zeros_gn is not None, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=gemv_k)
        return partial.sum(0).to(x.dtype)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m, block_n = 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    quant_gemm_kernel[grid](
        x, qweight_kn, scales_gn, zeros, out, M, N, K,
        x.stride(0), x.stride(1), qweight_kn.stride(0), qweight_kn.stride(1), scales_gn.stride(0),
        scales_gn.stride(1), out.stride(0), out.stride(1), BITS=bits, GROUP=group,
        HAS_ZEROS=zeros_gn is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
