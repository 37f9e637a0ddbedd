"""KV-cache quantization: int8 or fp8 (e4m3) keys and values with one scale per token per KV head.

A quantized layer cache is two tensors: the codes, in the backend's page layout ([2, blocks, block_size,
kv_heads, head_dim] for the torch backend), and their scales beside them ([2, blocks, block_size, kv_heads],
float16). A token's scale comes from that token's own values (absmax over head_dim), so what is stored for a
token never depends on which step wrote it or what else was in the batch: chunked prefill, prefix-cache hits,
preemption and speculation read back exactly the same values, and no older token is ever rescaled.

    x[t, h, :] ~= codes[t, h, :] * scale[t, h]      scale = absmax(x[t, h, :]) / code_max

int8 codes are -127..127 (symmetric, -128 unused); fp8 codes are float8_e4m3fn values in [-448, 448].
Everything here is plain PyTorch: it is the CPU path and the twin a GPU store/read kernel is checked against.
"""

from __future__ import annotations

import torch

from tokenmill.quant.codes import FP8_MAX

INT8_MAX = 127.0  # symmetric codes: -128 is never used, so negating a value never overflows
SCALE_DTYPE = torch.float16  # half the bytes of float32; its rounding (2^-11) is far below int8's step
# Smallest and largest scales float16 holds as non-zero, finite values: an all-zero head gets the smallest
# (its codes are zeros either way) instead of a zero that would divide; huge values saturate, never inf.
_SCALE_MIN = 2.0**-24
_SCALE_MAX = 65504.0


def quantized_kv_dtypes() -> tuple[torch.dtype, ...]:
    """The code dtypes of quantized KV caches (a cache of another dtype holds plain values)."""
    return (torch.int8, torch.float8_e4m3fn)


def is_quantized_kv(dtype: torch.dtype) -> bool:
    return dtype in quantized_kv_dtypes()


def kv_cache_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer's KV pages are stored in for the `kv_cache_dtype` setting (auto: the model's).

    The setting's name was checked with the config (config.KV_CACHE_DTYPES)."""
    return {"int8": torch.int8, "fp8": torch.float8_e4m3fn}.get(kv_cache_dtype, model_dtype)


def kv_bytes_per_token_head(dtype: torch.dtype, head_dim: int) -> int:
    """Bytes one token's key (or value) of one KV head takes in a cache of `dtype`, its scale included."""
    element = torch.empty((), dtype=dtype).element_size()
    scale = torch.empty((), dtype=SCALE_DTYPE).element_size() if is_quantized_kv(dtype) else 0
    return head_dim * element + scale


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes [..., head_dim] of `dtype`, scales [...] float16), one scale per row.

    The scale is rounded to float16 before dividing, so codes * stored scale is what the codes mean."""
    code_max = INT8_MAX if dtype == torch.int8 else FP8_MAX
    values = x.float()
    scales = (values.abs().amax(dim=-1) / code_max).clamp(_SCALE_MIN, _SCALE_MAX).to(SCALE_DTYPE)
    # Rounding the scale may shrink it by 2^-11 relative: a code may land a hair past code_max; clamp it back.
    scaled = (values / scales.float().unsqueeze(-1)).clamp(-code_max, code_max)
    if dtype == torch.int8:
        return torch.round(scaled).to(torch.int8), scales
    if dtype == torch.float8_e4m3fn:
        return scaled.to(torch.float8_e4m3fn), scales
    raise ValueError(f"{dtype} is not a quantized KV dtype ({quantized_kv_dtypes()})")


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., head_dim] and scales [...] -> values [..., head_dim] in `dtype`.

    One pass over the int8 codes (on the CPU this is what reading a quantized cache costs, 1.8x less than
    converting to float32 first): the scale is taken in `dtype`, the product rounded once to `dtype`. Exact in
    float32; a bfloat16 model reads each value with its scale rounded to bfloat16 (2^-9), as fine as its own
    values."""
    if codes.dtype == torch.float8_e4m3fn:
        codes = codes.to(dtype)  # torch does no arithmetic on float8; every e4m3 value is exact in dtype
    return torch.mul(codes, scales.to(dtype).unsqueeze(-1))


def store_kv_quantized(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, kv_scales: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Quantize keys/values [T, kv_heads, head_dim] and write codes and scales at their slots of a
    [2, blocks, block_size, kv_heads, head_dim] cache and its [2, blocks, block_size, kv_heads] scales."""
    codes, scales = quantize_kv(torch.stack((key, value)), kv_cache.dtype)
    pages = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    if kv_cache.dtype == torch.float8_e4m3fn:  # CPU index_copy_ has no float8 kernel; the bytes are the same
        pages, codes = pages.view(torch.uint8), codes.view(torch.uint8)
    pages.index_copy_(1, slot_mapping, codes)
    kv_scales.view(2, -1, kv_scales.shape[-1]).index_copy_(1, slot_mapping, scales)
