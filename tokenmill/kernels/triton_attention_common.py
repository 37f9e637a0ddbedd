"""Pieces shared by the Triton attention kernels (decode and varlen)."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The Triton interpreter multiplies bfloat16 tiles as their raw 16-bit patterns (triton 3.9), so there the
# operands are widened to float32 first. That is what the tensor cores compute anyway (exact products of
# 16-bit inputs, float32 sums), so the interpreter still checks the kernel's arithmetic; compiled code keeps
# 16-bit operands.
WIDEN_DOT_OPERANDS = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def mma(a, b):
    """a @ b with float32 accumulation; float32 operands in full precision (no TF32), as the twin computes."""
    if WIDEN_DOT_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def tanh(x):
    """tanh in float32 as 1 - 2 / (exp(2x) + 1): exact at both tails (exp overflows to inf -> 1, underflows -> -1)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def score_tile(q, k, scale, softcap, USE_SOFTCAP: tl.constexpr):
    """q [M, D] . k [N, D] -> scores [M, N] in base 2 (times log2(e)), so the softmax runs on exp2, the GPU's
    native exponential; soft-capped first when USE_SOFTCAP (the cap applies to natural-unit scores)."""
    scores = mma(q, tl.trans(k.to(q.dtype)))
    if USE_SOFTCAP:
        return softcap * tanh(scores * (scale / softcap)) * 1.4426950408889634
    return scores * (scale * 1.4426950408889634)


@triton.jit
def visible_range(first_query_pos, last_query_pos, seq_len, window, USE_WINDOW: tl.constexpr):
    """[first, end) of the key positions that any query at positions [first_query_pos, last_query_pos] sees:
    causal (keys up to the query's own position) and, with a window, only the last `window` of them."""
    end = tl.minimum(seq_len, last_query_pos + 1)
    if USE_WINDOW:
        first = tl.maximum(first_query_pos - window + 1, 0)
    else:
        first = first_query_pos * 0
    return first, end
