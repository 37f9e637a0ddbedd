"""Size the KV pool and allocate one paged cache tensor per attention layer, bound with its backend."""

from __future__ import annotations

import torch

from tokenmill.attention.base import AttentionBackend
from tokenmill.errors import ConfigError
from tokenmill.layers.attention import Attention


def bytes_per_block(layers: list[Attention], block_size: int, dtype: torch.dtype) -> int:
    element_size = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * block_size * layer.num_kv_heads * layer.head_dim * element_size for layer in layers)


def allocate_kv_caches(
    layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
    backend: AttentionBackend | None = None,
) -> list[torch.Tensor]:
    """Allocate each layer's cache in its backend's layout (the platform's backend by default) and bind it."""
    if backend is None:
        from tokenmill.platform import attention_backend

        backend = attention_backend(device)
    caches = []
    for layer in layers:
        shape = backend.kv_cache_shape(num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        cache = torch.zeros(shape, dtype=dtype, device=device)
        layer.bind(cache, backend)
        caches.append(cache)
    return caches


def check_pool_holds_context(num_blocks: int, block_size: int, max_model_len: int) -> None:
    """A request alone must always fit, or preemption could never make room for it."""
    if num_blocks * block_size < max_model_len:
        raise ConfigError(
            "max_model_len",
            f"the KV pool holds {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size} tokens, "
            f"fewer than max_model_len={max_model_len}; lower max_model_len or give more KV memory "
            f"(num_kv_blocks / kv_cache_memory / gpu_memory_utilization)"
        )
