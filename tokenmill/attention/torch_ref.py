"""Paged attention in plain PyTorch: the CPU backend and the oracle for the GPU kernels.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; a token at
position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.worker.forward_context import AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values [num_tokens, num_kv_heads, head_dim] at their slots."""
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, num_kv_heads, head_dim] of one sequence, gathered from its pages."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    pages = kv_cache[:, block_table[:num_blocks].long()]  # [2, n, block_size, kvh, d]
    pages = pages.reshape(2, num_blocks * block_size, kv_cache.shape[-2], kv_cache.shape[-1])
    return pages[0, :seq_len], pages[1, :seq_len]


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries [num_tokens, num_heads, head_dim] over its cache."""
    num_heads = query.shape[1]
    num_kv_heads = kv_cache.shape[-2]
    out = torch.empty_like(query)
    starts = metadata.query_start_loc_host
    for i, seq_len in enumerate(metadata.seq_lens_host):
        q_begin, q_end = starts[i], starts[i + 1]
        query_len = q_end - q_begin
        if query_len == 0:
            continue
        key, value = gather_kv(kv_cache, metadata.block_tables[i], seq_len)
        q = query[q_begin:q_end].transpose(0, 1)  # [H, q, d]
        k = key.transpose(0, 1).to(q.dtype)
        v = value.transpose(0, 1).to(q.dtype)
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=0)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=0)
        q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        out[q_begin:q_end] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
    return out
