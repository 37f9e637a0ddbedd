"""Size the KV pool and allocate one paged cache tensor per attention layer."""

from __future__ import annotations

import torch

from tokenmill.errors import ConfigError
from tokenmill.layers.attention import Attention


def bytes_per_block(layers: list[Attention], block_size: int, dtype: torch.dtype) -> int:
    element_size = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * block_size * layer.num_kv_heads * layer.head_dim * element_size for layer in layers)


def num_blocks_for_budget(layers: list[Attention], block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return budget_bytes // bytes_per_block(layers, block_size, dtype)


def allocate_kv_caches(
    layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Allocate [2, num_blocks, block_size, kv_heads, head_dim] per layer and bind it to the layer."""
    caches = []
    for layer in layers:
        cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim, dtype=dtype, device=device)
        layer.kv_cache = cache
        caches.append(cache)
    return caches


def check_pool_holds_context(num_blocks: int, block_size: int, max_model_len: int) -> None:
    """A request alone must always fit, or preemption could never make room for it."""
    if num_blocks * block_size < max_model_len:
        raise ConfigError(
            "max_model_len",
            f"the KV pool holds {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size} tokens, "
            f"fewer than max_model_len={max_model_len}; lower max_model_len or give more KV memory "
            f"(num_kv_blocks / kv_cache_memory_gb)"
        )
