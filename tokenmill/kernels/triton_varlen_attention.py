"""Paged attention for any number of new queries per sequence: prefill chunks, prefix-cache hits and draft
verification, all read back from the paged cache (this step's keys are stored first).

Twin: `reference.paged_varlen_attention`. A program takes one work item (a sequence and a tile of BLOCK_M of its
rows, a row being a (query, query head of the KV head's group) pair, so each key tile is loaded once for the
whole group) and one KV head. The work list holds only tiles with rows in them, the ones that see the most
keys first: a step mixing a 2,048-token prefill chunk with hundreds of decodes launches no programs that would
only exit. Queries sit at the last positions of their sequence; the key tiles walked are only those some
row of the tile can see (causal, sliding window), and masking within a tile handles the rest. Online softmax
in float32 (flash attention's running max and sum).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_attention_common import mma, score_tile, visible_range


@triton.jit
def varlen_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, work_ptr, out_ptr,
    scale, softcap, window, block_size,
    stride_qt, stride_qh, stride_cache_block, stride_cache_slot, stride_cache_head, stride_table,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
):
    seq = tl.load(work_ptr + 2 * tl.program_id(0)).to(tl.int64)
    tile = tl.load(work_ptr + 2 * tl.program_id(0) + 1)
    kv_head = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    if tile * BLOCK_M < q_len * GROUP:  # always, for a work list from work_items
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        query = rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        row_ok = query < q_len
        q_pos = seq_len - q_len + query
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + (q_start + query).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh
                    + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        last_query = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
        first, end = visible_range(seq_len - q_len + (tile * BLOCK_M) // GROUP, seq_len - q_len + last_query,
                                   seq_len, window, USE_WINDOW)
        first = first // BLOCK_N * BLOCK_N  # tile-aligned walk; the mask drops the keys before `first`
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile leaves it unchanged
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        table = block_tables_ptr + seq * stride_table
        for start in range(first, end, BLOCK_N):
            tokens = start + tl.arange(0, BLOCK_N)
            token_ok = tokens < end
            blocks = tl.load(table + tokens // block_size, mask=token_ok, other=0).to(tl.int64)
            where = (blocks * stride_cache_block + (tokens % block_size) * stride_cache_slot
                     + kv_head * stride_cache_head)[:, None] + dims[None, :]
            kv_mask = token_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_cache_ptr + where, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + where, mask=kv_mask, other=0.0)
            scores = score_tile(q, k, scale, softcap, USE_SOFTCAP)
            visible = token_ok[None, :] & (tokens[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (tokens[None, :] > q_pos[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + query).to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh
                 + dims[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def launch_config(group: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    block_d = max(triton.next_power_of_2(head_dim), 16)
    wide = block_d > 128 or dtype == torch.float32  # fp32 tiles and 256-wide heads take twice the shared memory
    return {"GROUP": group, "HEAD_DIM": head_dim, "BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "BLOCK_D": block_d,
            "num_warps": 4 if block_d <= 64 else 8, "num_stages": 2}


def work_items(query_lens: np.ndarray, group: int, head_dim: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """[W, 2] int32 (sequence, row tile) pairs for the kernel's launch, from the host's query lengths (no
    device sync): every tile holding some sequence's rows, those furthest into their sequence first (they see
    the most keys), so the longest programs start early."""
    block_m = launch_config(group, head_dim, dtype)["BLOCK_M"]
    tiles = -(-np.asarray(query_lens, dtype=np.int64) * group // block_m)
    seqs = np.repeat(np.arange(len(tiles)), tiles)
    tile = np.arange(len(seqs)) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    order = np.argsort(-tile, kind="stable")
    pairs = np.stack((seqs[order], tile[order]), axis=1).astype(np.int32)
    return torch.from_numpy(pairs).to(device, non_blocking=True)


def paged_varlen_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    work: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [T, H, D]; sequence i owns queries [query_start_loc[i], query_start_loc[i + 1]) at the last
    positions of its seq_lens[i] tokens, whose keys and values are in kv_cache [2, blocks, block_size, kvh, D].
    `work`: work_items of the step's query lengths (built once per step, shared by every layer)."""
    num_tokens, num_heads, head_dim = query.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query) if out is None else out
    if num_tokens == 0 or work.shape[0] == 0:
        return out
    config = launch_config(group, head_dim, query.dtype)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    varlen_attention_kernel[(work.shape[0], num_kv_heads)](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, work, out,
        scale, softcap or 0.0, sliding_window or 0, k_cache.shape[1],
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        **config, USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None,
        num_warps=warps, num_stages=stages,
    )
    return out
