"""Paged attention through the Triton kernels of `tokenmill.kernels` (the GPU backend).

The KV layout is the torch backend's, [2, num_blocks, block_size, num_kv_heads, head_dim], so the two are
interchangeable over the same pool. Each layer stores its new keys and values by slot mapping, then either
- every sequence has one new query (a decode step): the split-KV decode kernel, its contexts cut into as many
  partitions as it takes to fill the GPU; or
- otherwise (prefill chunks, prefix hits, draft verification, mixed steps): the varlen kernel over the cache.
Triton is imported when this module is, which `tokenmill.platform` does only when this backend is chosen.

CUDA graphs: a decode step padded to a graph's batch size carries its lengths on the device
(`metadata.seq_lens_device`). Then the plan reads nothing from the host arrays: lengths come from that tensor,
and the partition count from the static bounds (rows and width of the block table), so a captured graph
replays correctly for any lengths. The kernel divides each context among the partitions by its actual length
on the device, so partitions past a short context are empty and cost one early exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.attention.base import AttentionBackend
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.errors import ConfigError
from tokenmill.kernels.triton_decode_attention import num_partitions_for, paged_decode_attention
from tokenmill.kernels.triton_kv_store import store_kv
from tokenmill.kernels.triton_varlen_attention import paged_varlen_attention, work_items

# KV-cache element types the kernels read directly (a quantized cache needs its scales; not supported here).
KV_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class _Plan:
    decode_only: bool  # one new query per sequence: the split-KV decode kernel
    seq_lens: torch.Tensor  # [S] on the device
    query_start_loc: torch.Tensor | None  # [S + 1] on the device; None for decode-only steps (not read)
    query_lens: np.ndarray  # on the host: the varlen kernel's work list is built from them
    num_seqs: int
    max_seq_len: int  # sizes the decode partitions: the longest context, or its static bound in a graph step
    partitions: dict[int, int] = field(default_factory=dict)  # num_kv_heads -> decode partitions
    work: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict)  # varlen work lists

    def num_partitions(self, num_kv_heads: int) -> int:
        count = self.partitions.get(num_kv_heads)
        if count is None:
            count = self.partitions[num_kv_heads] = num_partitions_for(self.num_seqs, num_kv_heads, self.max_seq_len)
        return count

    def work_for(self, group: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The varlen work list for layers of this shape (built by the first such layer of the step)."""
        key = (group, head_dim, dtype)
        work = self.work.get(key)
        if work is None:
            work = self.work[key] = work_items(self.query_lens, group, head_dim, dtype, self.seq_lens.device)
        return work


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def build_plan(self, metadata: AttentionMetadata, sliding_window: int | None, num_blocks: int,
                   device: torch.device) -> _Plan:
        if metadata.seq_lens_device is not None:  # a padded decode step, maybe being captured in a graph
            rows, width = metadata.block_tables.shape
            return _Plan(decode_only=True, seq_lens=metadata.seq_lens_device, query_start_loc=None,
                         query_lens=np.ones(rows, dtype=np.int64), num_seqs=rows, max_seq_len=width * metadata.block_size)
        query_lens = metadata.query_lens
        decode_only = bool(len(query_lens)) and bool((query_lens == 1).all())
        return _Plan(
            decode_only=decode_only,
            seq_lens=_to_device(metadata.seq_lens, device),
            query_start_loc=None if decode_only else _to_device(metadata.query_start_loc, device),
            query_lens=query_lens,
            num_seqs=metadata.num_seqs,
            max_seq_len=metadata.max_seq_len,
        )

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
        """`kv_scales` (the scales beside a quantized cache) must be None: the kernels read plain caches."""
        if kv_scales is not None or kv_cache.dtype not in KV_CACHE_DTYPES:
            raise ConfigError("kv_cache_dtype", f"the triton attention backend reads float16, bfloat16 or float32 "
                                                f"KV caches, not {kv_cache.dtype}; use attention_backend='torch'")
        store_kv(key, value, kv_cache, metadata.slot_mapping)
        plan: _Plan = self.plan_for(metadata, sliding_window, kv_cache.shape[1], query.device)
        query = query if query.stride(-1) == 1 else query.contiguous()
        if plan.decode_only:
            return paged_decode_attention(query, kv_cache, metadata.block_tables, plan.seq_lens, scale,
                                          sliding_window, softcap, plan.num_partitions(kv_cache.shape[3]))
        assert plan.query_start_loc is not None
        work = plan.work_for(query.shape[1] // kv_cache.shape[3], query.shape[2], query.dtype)
        return paged_varlen_attention(query, kv_cache, metadata.block_tables, plan.seq_lens, plan.query_start_loc,
                                      work, scale, sliding_window, softcap)


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(host)).to(device, non_blocking=True)
