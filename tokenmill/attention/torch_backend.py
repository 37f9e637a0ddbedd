"""Paged attention in plain PyTorch: the CPU backend and the oracle for the GPU kernels.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; a token at
position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.

Two kinds of work per step:
- short queries (decodes, draft verification: at most SHORT_MAX_QUERY_LEN new tokens) are attended in
  one batch: one gather of every sequence's pages, one SDPA call with grouped KV heads (no copies of KV
  heads), and a mask only where lengths differ or several queries per sequence need causality;
- long queries (prefill chunks) one sequence at a time; a prompt's first chunk attends over its own
  keys and values with a causal SDPA, without reading the cache back.

Soft-capped scores (Gemma 2) are not expressible with SDPA: with a softcap every path above attends
through one plain matmul-softmax instead (`_capped_attention`), over the same pages and masks.

A quantized cache (int8 / fp8 codes, quant/kv_cache.py) has its scales [2, num_blocks, block_size,
num_kv_heads] beside it: every path reads the same pages and scales and dequantizes them to the query's dtype
before attending. A fresh prompt chunk then reads its keys back from the cache too, so every query sees the
stored values whichever way its prompt was chunked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill.attention.base import AttentionBackend
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.kernels.reference import soft_cap, store_kv
from tokenmill.quant.kv_cache import dequantize_kv, store_kv_quantized

# Sequences with at most this many new queries are attended in one padded batch; longer ones (prefill
# chunks) one at a time, where padding would waste more than the loop costs.
SHORT_MAX_QUERY_LEN = 16


@dataclass
class _ShortBatch:
    """Sequences attended in one padded batch, and what every layer needs to do it."""

    seqs: list[int]
    max_q: int
    max_len: int
    page_rows: torch.Tensor  # rows of the cache's page view: every sequence's n blocks of keys, then of values
    page_range: tuple[int, int] | None  # (first block, count): one sequence on consecutive blocks, read in place
    rows: torch.Tensor | None  # [S, max_q] query rows, right-aligned per sequence; None: a plain reshape
    mask: torch.Tensor | None  # [S, 1, max_q, max_len] or None when every query sees its whole context
    query_span: tuple[int, int]  # flat query rows covered when rows is None


@dataclass
class _LongSeq:
    seq: int
    q_start: int
    q_end: int
    fresh: bool  # the chunk is the whole context so far: attend over its own keys, causal, no gather
    mask: torch.Tensor | None  # [q, seq_len] when not fresh


@dataclass
class _Plan:
    short: _ShortBatch | None
    long: list[_LongSeq]
    whole_step_short: bool  # every query of the step is in `short`, in order: its output is the step's
    # The whole step is one query of one sequence whose blocks are consecutive (batch-1 decode): its context
    # is the flat cache's tokens [start, start + length), attended in place with a handful of ops.
    single: tuple[int, int] | None = None


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    stores_quantized_kv = True

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if kv_scales is None:
            store_kv(key, value, kv_cache, metadata.slot_mapping)
        else:
            store_kv_quantized(key, value, kv_cache, kv_scales, metadata.slot_mapping)
        plan: _Plan = self.plan_for(metadata, sliding_window, kv_cache.shape[1], query.device)
        if plan.single is not None:
            start, length = plan.single
            context = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1]).narrow(1, start, length)
            if kv_scales is not None:
                scales = kv_scales.view(2, -1, kv_scales.shape[-1]).narrow(1, start, length)
                context = dequantize_kv(context, scales, query.dtype)
            # 4-d inputs: CPU SDPA takes its flash kernel for them (3-d ones fall to a path 2.5x slower).
            attended = _sdpa(query.transpose(0, 1)[None], context[0].transpose(0, 1)[None],
                             context[1].transpose(0, 1)[None], None, scale, softcap)
            return attended[0].transpose(0, 1)
        if plan.whole_step_short:
            assert plan.short is not None
            return _attend_short(query, kv_cache, kv_scales, plan.short, scale, softcap)
        out = torch.empty_like(query)
        for item in plan.long:
            q = query[item.q_start : item.q_end].transpose(0, 1)  # [H, q, D]
            if item.fresh and kv_scales is None and key.dtype == kv_cache.dtype:
                k = key[item.q_start : item.q_end].transpose(0, 1)
                v = value[item.q_start : item.q_end].transpose(0, 1)
            else:  # what the cache holds (dequantized), so chunked and whole prompts see the same keys
                k, v = _gather_one(kv_cache, kv_scales, metadata.block_tables[item.seq],
                                   int(metadata.seq_lens[item.seq]), q.dtype)
            if not item.fresh:
                attended = _sdpa(q, k, v, item.mask, scale, softcap)
            elif softcap is None:
                attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            else:
                attended = _capped_attention(q, k, v, None, scale, softcap, causal=True)
            out[item.q_start : item.q_end] = attended.transpose(0, 1)
        if plan.short is not None:
            attended = _attend_short(query, kv_cache, kv_scales, plan.short, scale, softcap)
            _write_short(out, attended, plan.short, metadata)
        return out

    def build_plan(self, metadata: AttentionMetadata, sliding_window: int | None, num_blocks: int,
                   device: torch.device) -> _Plan:
        starts, seq_lens = metadata.query_start_loc, metadata.seq_lens
        query_lens = np.diff(starts)
        short: list[int] = []
        long: list[_LongSeq] = []
        for i, (query_len, seq_len) in enumerate(zip(query_lens.tolist(), seq_lens.tolist())):
            if query_len == 0:
                continue
            if query_len <= SHORT_MAX_QUERY_LEN:
                short.append(i)
                continue
            fresh = query_len == seq_len and (sliding_window is None or sliding_window >= seq_len)
            mask = None if fresh else _causal_mask(torch.tensor([seq_len]), query_len, seq_len, sliding_window, device)[0]
            long.append(_LongSeq(i, int(starts[i]), int(starts[i + 1]), fresh, mask))
        batch = _short_batch(metadata, short, sliding_window, num_blocks, device) if short else None
        whole = batch is not None and not long and batch.rows is None and batch.query_span == (0, int(starts[-1]))
        single = None
        if whole and batch is not None and batch.page_range is not None and batch.max_q == 1 and batch.mask is None:
            single = (batch.page_range[0] * metadata.block_size, batch.max_len)
        return _Plan(batch, long, whole, single)


def _short_batch(
    metadata: AttentionMetadata, seqs: list[int], sliding_window: int | None, num_blocks: int, device: torch.device
) -> _ShortBatch:
    starts = metadata.query_start_loc
    seq_lens = metadata.seq_lens[seqs]
    query_lens = (starts[np.asarray(seqs) + 1] - starts[seqs])
    max_len, max_q = int(seq_lens.max()), int(query_lens.max())
    block_size = metadata.block_size
    num_pages = -(-max_len // block_size)
    tables = metadata.block_tables[seqs, :num_pages]
    rows_of_pages = page_rows(tables, num_blocks)
    page_range = None
    if len(seqs) == 1:  # a lone sequence on consecutive blocks (the usual batch-1 decode) needs no gather
        row = metadata.block_tables_host[seqs[0], :num_pages]
        if int(row[-1]) - int(row[0]) == num_pages - 1 and bool((np.diff(row) == 1).all()):
            page_range = (int(row[0]), num_pages)
    first, last = int(starts[seqs[0]]), int(starts[seqs[-1] + 1])
    adjacent = bool((query_lens == max_q).all()) and last - first == max_q * len(seqs)
    rows = None
    if not adjacent:
        # Queries right-aligned per sequence: padded row r of sequence s is its query max_q - q_len(s) + r.
        ends = starts[np.asarray(seqs) + 1]
        rows = torch.from_numpy(np.maximum(ends[:, None] - max_q + np.arange(max_q)[None, :], 0)).to(device)
    window_cuts = sliding_window is not None and max_len > sliding_window  # some key falls out of a window
    needs_mask = max_q > 1 or bool((seq_lens != max_len).any()) or window_cuts
    mask = None
    if needs_mask:
        mask = _causal_mask(torch.from_numpy(seq_lens), max_q, max_len, sliding_window, device)[:, None]
    return _ShortBatch(seqs, max_q, max_len, rows_of_pages, page_range, rows, mask, (first, last))


def _attend_short(query: torch.Tensor, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None, batch: _ShortBatch,
                  scale: float, softcap: float | None) -> torch.Tensor:
    """[S * max_q, H, D] attention of the short-query sequences, each padded to the longest context."""
    num_seqs, heads, head_dim = len(batch.seqs), query.shape[1], query.shape[2]
    if batch.page_range is not None:
        first_block, count = batch.page_range
        pages = kv_cache[:, first_block : first_block + count]  # a view: the blocks are already in order
        if kv_scales is not None:
            pages = dequantize_kv(pages, kv_scales[:, first_block : first_block + count], query.dtype)
    else:
        pages = gather_pages(kv_cache, batch.page_rows, kv_scales, query.dtype)
    pages = pages.reshape(2, num_seqs, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    key, value = pages[0, :, : batch.max_len].transpose(1, 2), pages[1, :, : batch.max_len].transpose(1, 2)
    if batch.rows is None:
        first, last = batch.query_span
        q = query[first:last].view(num_seqs, batch.max_q, heads, head_dim)
    else:
        q = query[batch.rows]  # [S, max_q, H, D]
    attended = _sdpa(q.transpose(1, 2), key, value, batch.mask, scale, softcap)  # [S, H, max_q, D]
    return attended.transpose(1, 2).reshape(num_seqs * batch.max_q, heads, head_dim)


def _write_short(out: torch.Tensor, attended: torch.Tensor, batch: _ShortBatch, metadata: AttentionMetadata) -> None:
    if batch.rows is None:
        first, last = batch.query_span
        out[first:last] = attended
        return
    starts = metadata.query_start_loc
    attended = attended.view(len(batch.seqs), batch.max_q, *attended.shape[1:])
    for j, i in enumerate(batch.seqs):
        count = int(starts[i + 1] - starts[i])
        out[int(starts[i]) : int(starts[i + 1])] = attended[j, batch.max_q - count :]


def page_rows(block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Rows of the [2 * num_blocks, page] view of a cache holding the keys, then the values, of these blocks."""
    flat = block_tables.reshape(-1)
    return torch.cat((flat, flat + num_blocks))


def gather_pages(kv_cache: torch.Tensor, rows: torch.Tensor, kv_scales: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The pages at `rows` (page_rows) as [2, len(rows) // 2 * block_size, kvh, d]: one row-wise copy, which
    runs several times faster on CPU than advanced indexing of the 5-d cache (docs/perf.md). With the scales
    of a quantized cache, the pages come dequantized to `dtype`."""
    pages = kv_cache.view(kv_cache.shape[0] * kv_cache.shape[1], -1).index_select(0, rows)
    pages = pages.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    if kv_scales is None:
        return pages
    scales = kv_scales.view(kv_scales.shape[0] * kv_scales.shape[1], -1).index_select(0, rows)
    return dequantize_kv(pages, scales.view(2, -1, kv_scales.shape[-1]), dtype)


def _gather_one(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None, block_table: torch.Tensor, seq_len: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [kvh, seq_len, d] of one sequence in `dtype`, gathered from its pages."""
    blocks = block_table[: -(-seq_len // kv_cache.shape[2])]
    pages = gather_pages(kv_cache, page_rows(blocks, kv_cache.shape[1]), kv_scales, dtype)[:, :seq_len].to(dtype)
    return pages[0].transpose(0, 1), pages[1].transpose(0, 1)


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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
          softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads ([..., H, q, d] queries, [..., kvh, L, d] keys).
    Soft-capped scores take the plain path."""
    if softcap is not None:
        return _capped_attention(q, k, v, mask, scale, softcap, causal=False)
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if q.shape[-2] == 1 and heads != kv_heads:
        # One query per sequence (decode): the query heads sharing a KV head become that head's query rows, so
        # each KV head is read once, not once per query head as enable_gqa does (2-3x faster on CPU: perf.md).
        folded = q.reshape(*q.shape[:-3], kv_heads, heads // kv_heads, q.shape[-1])
        return F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale).reshape(q.shape)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)


def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                      softcap: float, causal: bool) -> torch.Tensor:
    """softmax(mask(softcap * tanh(q.k * scale / softcap))) v, softmax in float32 as the reference does it.
    `causal`: queries and keys are the same positions (a fresh prompt chunk), masked causally here.
    Query heads are grouped per KV head ([..., kvh, group, q, d]) so keys are never copied per head."""
    *batch, heads, num_q, dim = q.shape
    kv_heads = k.shape[-3]
    grouped = q.reshape(*batch, kv_heads, heads // kv_heads, num_q, dim)
    scores = soft_cap(torch.matmul(grouped, k.unsqueeze(-3).transpose(-1, -2)) * scale, softcap)
    if causal:
        mask = torch.ones(num_q, k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        # [..., 1, q, L] masks gain the group axis; [q, L] ones broadcast as they are.
        scores = scores.masked_fill(~(mask.unsqueeze(-3) if mask.dim() > 2 else mask), float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v.unsqueeze(-3)).reshape(*batch, heads, num_q, dim)
