"""Paged decode attention with split-KV (flash-decoding): one new query per sequence.

Twin: `reference.paged_decode_attention`. Each program takes one sequence, one KV head and one partition of
the context: the query heads sharing that KV head are the rows of its tile (GQA reads each key once), and
partitions of a long context run in parallel, so a batch of few sequences still fills the GPU. Each partition
writes its normalised output and log-sum-exp (base 2, as the exp2 softmax); a second kernel merges the
partitions by their log-sum-exp.
A partition's keys are read tile by tile through the block table (token n of a sequence lives in block
block_table[n // block_size] at offset n % block_size), so any block size works, not only powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_attention_common import mma, score_tile, visible_range

# Programs to aim for: a few waves of the 132 SMs of an H100/H200.
TARGET_PROGRAMS = 132 * 4
MIN_PARTITION_TOKENS = 128  # below this a partition's fixed cost (the merge) outweighs its parallelism
MAX_PARTITIONS = 64


@triton.jit
def decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale, softcap, window, block_size, num_partitions,
    stride_qt, stride_qh, stride_cache_block, stride_cache_slot, stride_cache_head, stride_table,
    stride_ot, stride_oh, stride_pt, stride_ph, stride_pp, stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    first, end = visible_range(seq_len - 1, seq_len - 1, seq_len, window, USE_WINDOW)
    # Partitions of whole tiles: every partition but the last gets `per` tokens.
    per = tl.cdiv(tl.cdiv(end - first, num_partitions), BLOCK_N) * BLOCK_N
    lo = first + partition * per
    hi = tl.minimum(lo + per, end)

    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile leaves it unchanged
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_table
    for start in range(lo, hi, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        token_ok = tokens < hi
        blocks = tl.load(table + tokens // block_size, mask=token_ok, other=0).to(tl.int64)
        where = (blocks * stride_cache_block + (tokens % block_size) * stride_cache_slot
                 + kv_head * stride_cache_head)[:, None] + dims[None, :]
        kv_mask = token_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + where, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + where, mask=kv_mask, other=0.0)
        scores = score_tile(q, k, scale, softcap, USE_SOFTCAP)
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v)
        m_i = m_new
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        empty = l_i == 0.0  # a partition past the context's end: weight zero in the merge
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # base 2, as the scores
        normalised = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(part_out_ptr + seq * stride_pt + heads[:, None] * stride_ph + partition * stride_pp + dims[None, :],
                 normalised, mask=out_mask)
        tl.store(part_lse_ptr + seq * stride_lt + heads * stride_lh + partition, lse, mask=row_ok)
    else:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def merge_partitions_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_partitions,
    stride_pt, stride_ph, stride_pp, stride_lt, stride_lh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    parts = tl.arange(0, BLOCK_P)
    dims = tl.arange(0, BLOCK_D)
    part_ok = parts < num_partitions
    lse = tl.load(part_lse_ptr + seq * stride_lt + head * stride_lh + parts, mask=part_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # an empty context (padding) weighs 0
    outs = tl.load(part_out_ptr + seq * stride_pt + head * stride_ph + parts[:, None] * stride_pp + dims[None, :],
                   mask=part_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weights, axis=0)
    merged = tl.sum(outs * weights[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, merged.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def num_partitions_for(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Split the context only as far as it takes to fill the GPU, and never below MIN_PARTITION_TOKENS each."""
    wanted = triton.cdiv(TARGET_PROGRAMS, max(num_seqs * num_kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max_seq_len, MIN_PARTITION_TOKENS), MAX_PARTITIONS))


def launch_config(group: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    block_d = max(triton.next_power_of_2(head_dim), 16)
    block_n = 64 if block_d <= 128 and dtype != torch.float32 else 32
    return {"GROUP": group, "HEAD_DIM": head_dim, "BLOCK_H": max(triton.next_power_of_2(group), 16),
            "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 2}


def merge_config(head_dim: int, num_partitions: int) -> dict[str, int]:
    """Two partition tile sizes only: each distinct one is a compile, and graph capture over many batch sizes
    (each its own partition count) would otherwise compile several at start-up."""
    block_p = 8 if num_partitions <= 8 else triton.next_power_of_2(MAX_PARTITIONS)
    block_d = triton.next_power_of_2(head_dim)
    return {"HEAD_DIM": head_dim, "BLOCK_P": block_p, "BLOCK_D": block_d,
            "num_warps": 4 if block_p * block_d >= 4096 else 1}


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_partitions: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [S, H, D] (one per sequence, at position seq_lens[i] - 1) over kv_cache [2, blocks, block_size,
    kvh, D] -> [S, H, D]. `num_partitions` (num_partitions_for) splits each context into that many parts."""
    num_seqs, num_heads, head_dim = query.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    config = launch_config(num_heads // num_kv_heads, head_dim, query.dtype)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    split = num_partitions > 1
    part_out = part_lse = out  # unused placeholders when not split (the kernel never touches them)
    if split:
        part_out = torch.empty((num_seqs, num_heads, num_partitions, head_dim), dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty((num_seqs, num_heads, num_partitions), dtype=torch.float32, device=query.device)
    decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        query, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale, softcap or 0.0, sliding_window or 0, k_cache.shape[1], num_partitions,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        **config, USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None, SPLIT=split,
        num_warps=warps, num_stages=stages,
    )
    if split:
        merge = merge_config(head_dim, num_partitions)
        merge_warps = merge.pop("num_warps")
        merge_partitions_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_partitions,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), **merge, num_warps=merge_warps,
        )
    return out
