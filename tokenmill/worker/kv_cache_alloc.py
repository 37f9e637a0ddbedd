"""Size the KV pool and allocate one paged cache tensor per attention layer, bound with its backend.

A quantized cache (int8 / fp8 codes, quant/kv_cache.py) also gets its scales tensor beside the pages, and
its bytes count in the pool size: at the same KV memory it holds about twice bfloat16's tokens.
"""

from __future__ import annotations

import torch

from tokenmill.attention.base import AttentionBackend
from tokenmill.errors import ConfigError
from tokenmill.layers.attention import Attention
from tokenmill.quant.kv_cache import SCALE_DTYPE, is_quantized_kv, kv_bytes_per_token_head, kv_cache_storage_dtype


def bytes_per_block(layers: list[Attention], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all `layers` in a cache stored as `dtype` (a quantized one's scales
    included): the unit that turns a KV memory budget into a number of blocks."""
    return sum(2 * block_size * layer.num_kv_heads * kv_bytes_per_token_head(dtype, layer.head_dim)
               for layer in layers)


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The storage dtype for the `kv_cache_dtype` setting; fp8 only where torch can store it on the device."""
    from tokenmill.platform import supports_float8_storage

    dtype = kv_cache_storage_dtype(kv_cache_dtype, model_dtype)
    if dtype == torch.float8_e4m3fn and not supports_float8_storage(device):
        raise ConfigError("kv_cache_dtype", f"fp8 (float8_e4m3fn) tensors are not supported on {device} by this "
                                            f"torch {torch.__version__}; use int8 or auto")
    return dtype


def allocate_kv_caches(
    layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
    backend: AttentionBackend | None = None,
) -> list[torch.Tensor]:
    """Allocate each layer's cache in its backend's layout (the platform's backend by default) and bind it.

    `dtype` int8 or float8_e4m3fn makes a quantized cache, its scales bound beside it."""
    if backend is None:
        from tokenmill.platform import attention_backend

        backend = attention_backend(device)
    quantized = is_quantized_kv(dtype)
    if quantized and not backend.stores_quantized_kv:
        raise ConfigError("kv_cache_dtype", f"the {backend.name} attention backend cannot store a quantized "
                                            f"({dtype}) KV cache; use auto")
    caches = []
    for layer in layers:
        shape = backend.kv_cache_shape(num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        cache = torch.zeros(shape, dtype=dtype, device=device)
        scales = None
        if quantized:
            scales_shape = backend.kv_scales_shape(num_blocks, block_size, layer.num_kv_heads)
            scales = torch.zeros(scales_shape, dtype=SCALE_DTYPE, device=device)
        layer.bind(cache, backend, scales)
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
