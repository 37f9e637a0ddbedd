"""Attention layer: stores this step's K/V in the paged cache and attends over it through a backend.

Whoever allocates the KV pool binds each layer's cache and the platform's backend (`bind`); each step's
layout comes from the forward context, so the model itself never sees batching. Under torch.compile the
layer is one opaque custom op, so the compiled graph has no break and attention keeps its own code.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from tokenmill.attention.base import AttentionBackend
from tokenmill.attention.metadata import get_attention_metadata

_layer_ids = itertools.count()
_layers: weakref.WeakValueDictionary[int, Attention] = weakref.WeakValueDictionary()


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap  # attention-score soft-capping (Gemma 2); None: plain scores
        self.kv_cache: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None  # beside a quantized cache: a scale per token and KV head
        self.backend: AttentionBackend | None = None
        self.layer_id = next(_layer_ids)  # how the compiled graph's custom op finds this layer
        _layers[self.layer_id] = self

    def bind(self, kv_cache: torch.Tensor, backend: AttentionBackend, kv_scales: torch.Tensor | None = None) -> None:
        self.kv_cache, self.backend, self.kv_scales = kv_cache, backend, kv_scales

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [T, H, D], key/value [T, KVH, D] -> [T, H * D]."""
        if torch.compiler.is_compiling():
            return torch.ops.tokenmill.attention(query, key, value, self.layer_id)
        return self.attend(query, key, value)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.kv_cache is None or self.backend is None:
            raise RuntimeError("attention layer has no KV cache bound; the worker binds it")
        out = self.backend.forward(query, key, value, self.kv_cache, get_attention_metadata(), self.scale,
                                   self.sliding_window, self.softcap, kv_scales=self.kv_scales)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)


@torch.library.custom_op("tokenmill::attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_id: int) -> torch.Tensor:
    # Writes the layer's KV cache, which is not an argument: the op's output depends on its inputs, so the
    # compiler keeps it and its order relative to the layers around it.
    return _layers[layer_id].attend(query, key, value)


@_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_id: int) -> torch.Tensor:
    return query.new_empty(query.shape[0], query.shape[1] * query.shape[2])
