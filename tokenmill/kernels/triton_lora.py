"""Batched LoRA for a step of mixed adapters (bgmv style): every token gathers its own adapter slot.

Twin: `reference.lora_shrink_expand` (the layout of lora_a / lora_b is documented there). Shrink: one program per
(token, output slice) computes h = A[slot, slice] @ x[t] (rank values, float32 accumulation, rounded to the
model dtype as the twin's matmul output is). Expand: one program per (token, slice, block of the slice's
columns) adds B[slot, slice]^T h to y. A token whose slot is -1 (the base model) returns at once in both.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def lora_shrink_kernel(
    x_ptr, lora_a_ptr, slots_ptr, shrunk_ptr, in_features, rank,
    stride_x, stride_a_slice, stride_a_slot, stride_a_rank, stride_h_token,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    piece = tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    if slot < 0:
        return
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    a_rows = lora_a_ptr + piece.to(tl.int64) * stride_a_slice + slot * stride_a_slot + ranks[:, None] * stride_a_rank
    x_row = x_ptr + token.to(tl.int64) * stride_x
    for start in range(0, in_features, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < in_features, other=0.0).to(tl.float32)
        a = tl.load(a_rows + cols[None, :], mask=(ranks[:, None] < rank) & (cols[None, :] < in_features), other=0.0)
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    out = shrunk_ptr + token.to(tl.int64) * stride_h_token + piece * rank + ranks
    tl.store(out, acc.to(shrunk_ptr.dtype.element_ty), mask=ranks < rank)


@triton.jit
def lora_expand_kernel(
    shrunk_ptr, lora_b_ptr, slots_ptr, slices_ptr, y_ptr, rank,
    stride_h_token, stride_b_slice, stride_b_slot, stride_b_rank, stride_y,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    piece = tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    if slot < 0:
        return
    offset = tl.load(slices_ptr + 2 * piece)
    size = tl.load(slices_ptr + 2 * piece + 1)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    h = tl.load(shrunk_ptr + token.to(tl.int64) * stride_h_token + piece * rank + ranks, mask=ranks < rank,
                other=0.0).to(tl.float32)
    b_rows = lora_b_ptr + piece.to(tl.int64) * stride_b_slice + slot * stride_b_slot + ranks[:, None] * stride_b_rank
    b = tl.load(b_rows + cols[None, :], mask=(ranks[:, None] < rank) & (cols[None, :] < size), other=0.0)
    delta = tl.sum(b.to(tl.float32) * h[:, None], axis=0)
    y_row = y_ptr + token.to(tl.int64) * stride_y + offset + cols
    y = tl.load(y_row, mask=cols < size, other=0.0)
    tl.store(y_row, (y.to(tl.float32) + delta).to(y.dtype), mask=cols < size)


def shrink_config(rank: int, in_features: int) -> dict[str, int]:
    block_r = max(triton.next_power_of_2(rank), 16)
    return {"BLOCK_R": block_r, "BLOCK_K": min(triton.next_power_of_2(in_features), max(4096 // block_r, 32)),
            "num_warps": 4}


def expand_config(rank: int, width: int) -> dict[str, int]:
    block_r = max(triton.next_power_of_2(rank), 16)
    return {"BLOCK_R": block_r, "BLOCK_N": min(triton.next_power_of_2(width), max(8192 // block_r, 32)),
            "num_warps": 4}


@functools.cache
def _slice_table(slices: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(slices, dtype=torch.int64, device=device).reshape(-1)


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       token_slots: torch.Tensor, slices: Sequence[tuple[int, int]]) -> torch.Tensor:
    _, num_slices, rank, in_features = lora_a.shape
    tokens = x.shape[0]
    if tokens == 0:
        return y
    x = x if x.stride(-1) == 1 else x.contiguous()
    assert y.stride(-1) == 1 and lora_a.stride(-1) == 1 and lora_b.stride(-1) == 1
    shrunk = torch.empty((tokens, num_slices * rank), dtype=x.dtype, device=x.device)
    config = shrink_config(rank, in_features)
    lora_shrink_kernel[(tokens, num_slices)](
        x, lora_a, token_slots, shrunk, in_features, rank, x.stride(0), lora_a.stride(1), lora_a.stride(0),
        lora_a.stride(2), shrunk.stride(0), BLOCK_R=config["BLOCK_R"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"])
    width = max(size for _, size in slices)
    config = expand_config(rank, width)
    grid = (tokens, num_slices, triton.cdiv(width, config["BLOCK_N"]))
    lora_expand_kernel[grid](
        shrunk, lora_b, token_slots, _slice_table(tuple(slices), x.device), y, rank, shrunk.stride(0),
        lora_b.stride(1), lora_b.stride(0), lora_b.stride(2), y.stride(0), BLOCK_R=config["BLOCK_R"],
        BLOCK_N=config["BLOCK_N"], num_warps=config["num_warps"])
    return y
