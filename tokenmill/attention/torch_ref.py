"""Paged attention in plain PyTorch: the CPU backend and the oracle for the GPU kernels.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; a token at
position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# Sequences with at most this many new queries (decodes, draft verification) are attended in one padded
# batch; longer ones (prefill chunks) one at a time, where padding would waste more than the loop costs.
BATCHED_MAX_QUERY_LEN = 16


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries [num_tokens, num_heads, head_dim] over its cache."""
    out = torch.empty_like(query)
    starts = metadata.query_start_loc_host
    plan = _step_plan(metadata, kv_cache.shape[2], sliding_window, query.device)
    for i, mask in plan.long:
        key, value = gather_kv(kv_cache, metadata.block_tables[i], metadata.seq_lens_host[i])
        q = query[starts[i] : starts[i + 1]].transpose(0, 1)  # [H, q, d]
        attended = _attend(q, key.transpose(0, 1), value.transpose(0, 1), mask, scale)
        out[starts[i] : starts[i + 1]] = attended.transpose(0, 1)
    if plan.short is not None:
        _attend_short_batched(query, kv_cache, metadata, plan.short, scale, out)
    return out


@dataclass
class _ShortBatch:
    """Sequences attended in one padded batch, and what every layer needs to do it."""

    seqs: list[int]
    query_lens: list[int]
    max_q: int
    max_len: int
    tables: torch.Tensor  # [S, n] block ids covering max_len
    rows: torch.Tensor  # [S, max_q] query rows, right-aligned per sequence
    mask: torch.Tensor  # [S, 1, max_q, max_len]
    unpadded: bool  # every query length is max_q and the sequences' rows are adjacent: one copy writes all


@dataclass
class _StepPlan:
    long: list[tuple[int, torch.Tensor]]  # (sequence, its causal mask) for long query chunks
    short: _ShortBatch | None


def _step_plan(
    metadata: AttentionMetadata, block_size: int, sliding_window: int | None, device: torch.device
) -> _StepPlan:
    """Masks and gather indices of this step, built by its first attention layer and shared by the rest."""
    key = ("torch_ref", block_size, sliding_window)
    plan = metadata.layer_shared.get(key)
    if plan is not None:
        return plan
    starts = metadata.query_start_loc_host
    long: list[tuple[int, torch.Tensor]] = []
    short: list[int] = []
    for i, seq_len in enumerate(metadata.seq_lens_host):
        query_len = starts[i + 1] - starts[i]
        if query_len == 0:
            continue
        if query_len <= BATCHED_MAX_QUERY_LEN:
            short.append(i)
        else:
            mask = _causal_mask(torch.tensor([seq_len]), query_len, seq_len, sliding_window, device)[0]
            long.append((i, mask))
    plan = _StepPlan(long, _short_batch(metadata, short, block_size, sliding_window, device) if short else None)
    metadata.layer_shared[key] = plan
    return plan


def _short_batch(
    metadata: AttentionMetadata, seqs: list[int], block_size: int, sliding_window: int | None, device: torch.device
) -> _ShortBatch:
    starts = metadata.query_start_loc_host
    seq_lens = [metadata.seq_lens_host[i] for i in seqs]
    query_lens = [starts[i + 1] - starts[i] for i in seqs]
    max_len, max_q = max(seq_lens), max(query_lens)
    num_blocks = -(-max_len // block_size)
    # Queries right-aligned per sequence: padded row r of sequence s is its query max_q - q_len(s) + r.
    rows = torch.tensor([[starts[i + 1] - max_q + r for r in range(max_q)] for i in seqs], device=device).clamp_min(0)
    mask = _causal_mask(torch.tensor(seq_lens), max_q, max_len, sliding_window, device)[:, None]
    tables = metadata.block_tables[seqs, :num_blocks].long()
    span = starts[seqs[-1] + 1] - starts[seqs[0]]
    unpadded = all(n == max_q for n in query_lens) and span == max_q * len(seqs)
    return _ShortBatch(seqs, query_lens, max_q, max_len, tables, rows, mask, unpadded)


def _attend_short_batched(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, batch: _ShortBatch, scale: float,
    out: torch.Tensor,
) -> None:
    """Attention of many short-query sequences at once, each padded to the longest context among them."""
    starts, num_seqs = metadata.query_start_loc_host, len(batch.seqs)
    pages = kv_cache[:, batch.tables]  # [2, S, n, block_size, kvh, d]
    pages = pages.reshape(2, num_seqs, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    key = pages[0, :, : batch.max_len].transpose(1, 2)  # [S, kvh, L, d]
    value = pages[1, :, : batch.max_len].transpose(1, 2)
    q = query[batch.rows].transpose(1, 2)  # [S, H, max_q, d]
    attended = _attend(q, key, value, batch.mask, scale).transpose(1, 2)  # [S, max_q, H, d]
    if batch.unpadded:
        out[starts[batch.seqs[0]] : starts[batch.seqs[-1] + 1]] = attended.reshape(-1, *attended.shape[2:])
        return
    for j, i in enumerate(batch.seqs):
        out[starts[i] : starts[i + 1]] = attended[j, batch.max_q - batch.query_lens[j] :]


def _causal_mask(
    seq_lens: torch.Tensor, num_queries: int, max_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[S, num_queries, max_len]: the last num_queries positions of each sequence see their past."""
    seq_lens = seq_lens.to(device)[:, None, None]
    q_pos = seq_lens - num_queries + torch.arange(num_queries, device=device)[None, :, None]
    k_pos = torch.arange(max_len, device=device)[None, None, :]
    mask = (k_pos <= q_pos) & (k_pos < seq_lens)
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads ([..., H, q, d] queries, [..., kvh, L, d] keys)."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    groups = q.shape[-3] // k.shape[-3]
    if groups != 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
