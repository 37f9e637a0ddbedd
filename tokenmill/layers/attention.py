"""Attention layer: stores this step's K/V in the paged cache and attends over it.

The model runner binds `kv_cache` once after allocating the pool; each step's layout comes from the
forward context, so the model itself never sees batching.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.attention import torch_ref
from tokenmill.worker.forward_context import get_attention_metadata


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, num_kv_heads, head_dim]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [T, num_heads*head_dim], key/value [T, num_kv_heads*head_dim] -> [T, num_heads*head_dim]."""
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound; the model runner binds it")
        metadata = get_attention_metadata()
        q = query.view(-1, self.num_heads, self.head_dim)
        k = key.view(-1, self.num_kv_heads, self.head_dim)
        v = value.view(-1, self.num_kv_heads, self.head_dim)
        torch_ref.write_kv(k, v, self.kv_cache, metadata.slot_mapping)
        out = torch_ref.paged_attention(q, self.kv_cache, metadata, self.scale, self.sliding_window)
        return out.reshape(-1, self.num_heads * self.head_dim)
