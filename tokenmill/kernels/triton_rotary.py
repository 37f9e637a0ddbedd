"""Rotate-half (NeoX) RoPE over a precomputed cos/sin table.

Twin: `reference.apply_rotary`. The cos/sin rows are looked up per step by `layers.rotary` from the table that
already carries the frequency scaling (Llama-3, linear), so the kernel only rotates. With partial rotary
(rotary_dim < head_dim) the remaining features are copied through. One program per token and tile of heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    num_heads, stride_xt, stride_xh, stride_cos, stride_sin, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    head_ok = heads < num_heads
    mask = head_ok & (dims < HALF)
    # cos/sin repeat their first half in the second (cat(freqs, freqs)): the first half is all we need.
    cos = tl.load(cos_ptr + token * stride_cos + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_sin + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    x_row = x_ptr + token * stride_xt + heads * stride_xh
    x1 = tl.load(x_row + dims, mask=mask, other=0.0)
    x2 = tl.load(x_row + HALF + dims, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    out_row = out_ptr + token * stride_ot + heads * stride_oh
    tl.store(out_row + dims, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(out_row + HALF + dims, (b * cos + a * sin).to(x1.dtype), mask=mask)
    if BLOCK_REST > 0:  # partial rotary: features past 2 * HALF pass through
        rest = 2 * HALF + tl.arange(0, BLOCK_REST)[None, :]
        rest_mask = head_ok & (rest < HEAD_DIM)
        tl.store(out_row + rest, tl.load(x_row + rest, mask=rest_mask), mask=rest_mask)


def launch_config(num_heads: int, head_dim: int, rotary_dim: int) -> dict[str, int]:
    half = rotary_dim // 2
    rest = head_dim - rotary_dim
    block_half = triton.next_power_of_2(half)
    block_heads = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_half))
    return {"HEAD_DIM": head_dim, "HALF": half, "BLOCK_HEADS": block_heads, "BLOCK_HALF": block_half,
            "BLOCK_REST": triton.next_power_of_2(rest) if rest else 0,
            "num_warps": 4 if block_heads * block_half >= 1024 else 1}


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, 1, rotary_dim] (views of the table are fine) -> rotated copy of x."""
    num_tokens, num_heads, head_dim = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    cos, sin = cos.reshape(num_tokens, -1), sin.reshape(num_tokens, -1)
    config = launch_config(num_heads, head_dim, cos.shape[-1])
    num_warps = config.pop("num_warps")
    grid = (num_tokens, triton.cdiv(num_heads, config["BLOCK_HEADS"]))
    rotary_kernel[grid](x, cos, sin, out, num_heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                        out.stride(0), out.stride(1), **config, num_warps=num_warps)
    return out
