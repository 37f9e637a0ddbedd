"""The attention backend interface: one implementation per platform, chosen by `tokenmill.platform`.

A backend owns the KV cache layout of a layer, builds its per-step plan once (masks, gather indices,
split-KV partitions) from the step's `AttentionMetadata`, and runs attention layer by layer: store this
step's keys and values at their slots, then attend each sequence's new queries over its cached context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from tokenmill.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    name: str = "base"
    # True when forward() reads only device tensors of the metadata (seq_lens_device, block_tables,
    # slot_mapping) with shapes fixed by the padded batch, so a decode step can be captured in a CUDA graph.
    supports_cuda_graphs: bool = False
    # Whether the backend stores and reads quantized KV (int8 / fp8 codes with per-token scales,
    # quant/kv_cache.py); the allocator refuses a quantized cache for a backend that does not.
    stores_quantized_kv: bool = False

    @abstractmethod
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's paged KV cache tensor."""

    def kv_scales_shape(self, num_blocks: int, block_size: int, num_kv_heads: int) -> tuple[int, ...]:
        """Shape of one layer's KV scales when its cache is quantized: one per token per KV head, for keys and
        values, beside the pages (block b's scales are [:, b])."""
        return (2, num_blocks, block_size, num_kv_heads)

    @abstractmethod
    def build_plan(self, metadata: AttentionMetadata, sliding_window: int | None, num_blocks: int,
                   device: torch.device) -> Any:
        """What every layer of the step needs beyond the metadata itself (for a pool of num_blocks blocks);
        built once per step."""

    @abstractmethod
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
        """query [T, H, D], key/value [T, KVH, D] of this step's tokens -> attention output [T, H, D].

        Stores key/value in kv_cache at metadata.slot_mapping first; a quantized cache stores codes there and
        their scales in `kv_scales` (None: a cache of plain values). Scores are q.k * scale; a query sees the keys
        of its sequence up to its own position, and only the last `sliding_window` of them when set.
        `softcap` (Gemma 2's attn_logit_softcapping), when set, squashes each score to
        softcap * tanh(score / softcap) before masking and softmax; None leaves scores as they are."""

    def plan_for(self, metadata: AttentionMetadata, sliding_window: int | None, num_blocks: int,
                 device: torch.device) -> Any:
        key = (self.name, sliding_window, num_blocks)
        plan = metadata.plans.get(key)
        if plan is None:
            plan = metadata.plans[key] = self.build_plan(metadata, sliding_window, num_blocks, device)
        return plan
