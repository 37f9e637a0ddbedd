"""KV store by slot mapping: each new token's key and value rows written into the paged cache.

Twin: `reference.store_kv`. The cache is [2, blocks, block_size, kv_heads, head_dim]; slot s is block
s // block_size, offset s % block_size. One program per token copies its kv_heads * head_dim keys and values;
a slot < 0 marks a padding token (a CUDA graph's padded batch) and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def kv_store_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_slot, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
        value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
        # Slots of a block are consecutive rows of the flat [blocks * block_size, kvh, d] view.
        where = slot * stride_cache_slot + heads * stride_cache_head + dims
        tl.store(k_cache_ptr + where, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + where, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def launch_config(num_kv_heads: int, head_dim: int) -> dict[str, int]:
    """The constexprs and warps the launcher uses (the sm_90 compile test reads them too)."""
    block_heads, block_d = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    return {"NUM_KV_HEADS": num_kv_heads, "HEAD_DIM": head_dim, "BLOCK_HEADS": block_heads, "BLOCK_D": block_d,
            "num_warps": 4 if block_heads * block_d >= 2048 else 1}


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, kv_heads, head_dim] (last dim contiguous) -> kv_cache at slot_mapping [T]."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1) or k_cache.stride(2) != head_dim:
        raise ValueError("store_kv needs each half of the cache contiguous per block (slot = row of a flat view)")
    config = launch_config(num_kv_heads, head_dim)
    num_warps = config.pop("num_warps")
    kv_store_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        **config, num_warps=num_warps,
    )
