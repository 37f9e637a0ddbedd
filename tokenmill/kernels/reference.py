"""Torch twins of the layer kernels: on the CPU they are the implementation, on a GPU the test oracle.

Each function computes exactly what the Hugging Face reference computes (dtypes and rounding included),
so float32 logits match transformers to rounding. A fast kernel beside these must agree with them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back to x's dtype, then scale (the reference's order of rounding)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # the fused op; identical rounding in float32
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused into the next layer's norm."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def offset_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: scale by (1 + weight), all in float32, and cast back last (Gemma's order of rounding,
    unlike rms_norm's cast-then-scale)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(x.dtype)


def add_offset_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset_rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return offset_rms_norm(summed, weight, eps), summed


def rotary_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype) -> torch.Tensor:
    """[max_positions, 2, head_dim]: cos and sin of every position, computed in float32 then cast, as the
    reference computes them per step."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((angles.cos(), angles.sin()), dim=1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE. x [T, heads, head_dim]; cos/sin [T, 1, rotary_dim] in x's dtype. With
    rotary_dim < head_dim (partial rotary) only the leading rotary_dim features turn; the rest pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on a fused [T, 2 * I] gate/up projection: silu(gate) * up -> [T, I]."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (weights [T, k] float32, expert ids [T, k]). Softmax over all experts in float32, keep
    the k largest, and divide by their sum when `renormalize` (then it equals a softmax over the k logits,
    Mixtral's definition; Qwen3-MoE renormalizes only with norm_topk_prob)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    on_expert: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """SwiGLU experts on stacked weights: hidden [T, H], gate_up [E, 2I, H], down [E, H, I], top-k weights and
    ids [T, k] -> [T, H], each token the weighted sum of its k experts' outputs.

    Token-expert pairs are sorted by expert, so each active expert runs one matmul over all its tokens (the
    Python loop is over experts, never tokens); `on_expert(expert, num_tokens)` is called per expert matmul.
    Each pair's output is multiplied by its weight in the weights' dtype and cast back before the sum, the
    reference's rounding order.
    """
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of_pair = order // top_k
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()  # the one host sync
    grouped = hidden.index_select(0, token_of_pair)
    outputs = torch.empty_like(grouped)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        outputs[rows] = F.linear(silu_and_mul(F.linear(grouped[rows], gate_up[expert])), down[expert])
        if on_expert is not None:
            on_expert(expert, count)
        start += count
    weighted = (outputs * topk_weights.reshape(-1, 1).index_select(0, order)).to(hidden.dtype)
    return torch.zeros_like(hidden).index_add_(0, token_of_pair, weighted)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU's activation (Gemma) on a fused [T, 2 * I] gate/up projection: gelu_tanh(gate) * up -> [T, I]."""
    half = gate_up.shape[-1] // 2
    return F.gelu(gate_up[..., :half], approximate="tanh") * gate_up[..., half:]


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): squashes scores into (-cap, cap) (Gemma 2's attention and final logits)."""
    return torch.tanh(x / cap) * cap


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write keys/values [T, kv_heads, head_dim] to their slots of a [2, blocks, block_size, kv_heads,
    head_dim] cache (slot = block * block_size + offset)."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    pair = torch.stack((key, value))
    flat.index_copy_(1, slot_mapping, pair if pair.dtype == kv_cache.dtype else pair.to(kv_cache.dtype))


def weight_only_quant_matmul(x: torch.Tensor, qweight_kn: torch.Tensor, scales_gn: torch.Tensor,
                             zeros_gn: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The twin of kernels/triton_quant_matmul.py: x [M, K] @ W.T in float32, cast to x's dtype, where
    W[n, k] = (code[k, n] - zeros[g, n]) * scales[g, n] with g = k // (K / groups) and the codes packed along K
    in `qweight_kn` [K / per_byte, N] (column k at bits (k % per_byte) * bits; int8 codes are signed)."""
    if bits < 8:
        per_byte = 8 // bits
        parts = [(qweight_kn.to(torch.int32) >> (j * bits)) & ((1 << bits) - 1) for j in range(per_byte)]
        codes = torch.stack(parts, dim=1).reshape(-1, qweight_kn.shape[1]).float()  # [K, N]: row k = byte k // per_byte
    else:
        codes = qweight_kn.float()
    k_size = codes.shape[0]
    group = k_size // scales_gn.shape[0]
    if zeros_gn is not None:
        codes = codes - zeros_gn.float().repeat_interleave(group, dim=0)
    weight_kn = codes * scales_gn.float().repeat_interleave(group, dim=0)
    return (x.float() @ weight_kn).to(x.dtype)
def paged_varlen_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of every sequence's new queries over its paged context, in float32: the twin of the Triton
    varlen kernel (prefill chunks, prefix hits, draft verification).

    query [T, H, D]; kv_cache [2, blocks, block_size, kvh, D]; sequence i owns queries
    [query_start_loc[i], query_start_loc[i + 1]), at the last positions of its seq_lens[i] tokens. A query at
    position p sees keys at positions <= p, and only those > p - sliding_window when a window is set. Scores are
    soft-capped (softcap * tanh(score / softcap)) when softcap is set. Output in query's dtype."""
    block_size, heads, kv_heads = kv_cache.shape[2], query.shape[1], kv_cache.shape[3]
    out = torch.empty_like(query)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for seq, seq_len in enumerate(lens):
        first, last = starts[seq], starts[seq + 1]
        if last == first:
            continue
        blocks = block_tables[seq, : -(-seq_len // block_size)]
        keys = kv_cache[0, blocks].reshape(-1, kv_heads, kv_cache.shape[-1])[:seq_len].float()
        values = kv_cache[1, blocks].reshape(-1, kv_heads, kv_cache.shape[-1])[:seq_len].float()
        keys = keys.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)  # [H, L, D]
        values = values.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        q = query[first:last].float().transpose(0, 1)  # [H, q, D]
        scores = torch.matmul(q, keys.transpose(1, 2)) * scale
        if softcap is not None:
            scores = soft_cap(scores, softcap)
        q_pos = torch.arange(seq_len - (last - first), seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[first:last] = torch.matmul(weights, values).transpose(0, 1).to(query.dtype)
    return out


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One new query per sequence (query [S, H, D], at position seq_lens[i] - 1): the twin of the split-KV
    decode kernel; the varlen twin with one query each."""
    query_start_loc = torch.arange(query.shape[0] + 1, device=query.device)
    return paged_varlen_attention(query, kv_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                                  softcap)


class LoRATokenGroups(NamedTuple):
    """A step's adapted tokens grouped by LoRA slot, padded to the largest group (what lora_shrink_expand runs on).

    table[s, j] is the j-th token of slot s (token 0, whose result is dropped, past the group's end); `rows` are
    the positions of the flattened table that hold a token of the group, `token_ids` those tokens."""

    table: torch.Tensor  # [slots, longest group]
    rows: torch.Tensor
    token_ids: torch.Tensor


def lora_token_groups(token_slots: torch.Tensor, num_slots: int) -> LoRATokenGroups | None:
    """The grouping of lora_shrink_expand for these per-token slots (-1: the base model); None when no token has
    an adapter. Depends only on the step, so a forward computes it once for all its layers."""
    adapted = torch.nonzero(token_slots >= 0).squeeze(1)
    if adapted.numel() == 0:
        return None
    slots = token_slots[adapted]
    order = torch.argsort(slots, stable=True)
    tokens, slots = adapted[order], slots[order]
    counts = torch.bincount(slots, minlength=num_slots)
    position = torch.arange(tokens.numel(), device=tokens.device) - (torch.cumsum(counts, 0) - counts)[slots]
    longest = int(counts.max())
    table = torch.zeros((num_slots, longest), dtype=torch.int64, device=tokens.device)
    table[slots, position] = tokens
    rows = slots * longest + position
    return LoRATokenGroups(table, rows, tokens)


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       token_slots: torch.Tensor, slices: Sequence[tuple[int, int]],
                       groups: LoRATokenGroups | None = None) -> torch.Tensor:
    """y [T, out] plus every token's own LoRA delta, in place: with s = token_slots[t] (-1: the base model, no
    delta), for output slice i = (offset, size) of y,
        y[t, offset:offset + size] += lora_b[s, i, :, :size]^T (lora_a[s, i] x[t]).
    lora_a [slots, n_slices, rank, in]; lora_b [slots, n_slices, rank, widest slice], the scaling folded in; a
    lower-rank adapter's extra rows are zeros. `groups`: lora_token_groups of token_slots, when the caller has
    it already.

    One batched op over the step, not a loop over adapters (SGMV-style): the adapted tokens, grouped by slot and
    padded to the largest group, meet their own slot's A in one batched matmul over the slots and its B in one
    more (each weight read once per step); base-model tokens cost nothing. The Triton twin (triton_lora.py)
    gathers each token's slot instead."""
    num_slots, num_slices, rank, in_features = lora_a.shape
    width = lora_b.shape[-1]
    if sum(size for _, size in slices) != y.shape[1] or any(size > width for _, size in slices):
        raise ValueError(f"slices {list(slices)} must tile y's {y.shape[1]} columns, each at most {width} wide")
    groups = groups if groups is not None else lora_token_groups(token_slots, num_slots)
    if groups is None:
        return y
    padded = x.index_select(0, groups.table.reshape(-1)).view(num_slots, -1, in_features)
    shrunk = torch.bmm(padded, lora_a.view(num_slots, num_slices * rank, in_features).transpose(1, 2))
    shrunk = shrunk.view(num_slots, -1, num_slices, rank).transpose(1, 2)  # [slots, slices, longest, rank]
    delta = torch.matmul(shrunk, lora_b).transpose(1, 2).reshape(-1, num_slices * width)  # rows: (slot, position)
    delta = delta.index_select(0, groups.rows)
    if any(size != width for _, size in slices) or [offset for offset, _ in slices] != \
            [index * width for index in range(num_slices)]:
        delta = delta.index_select(1, _slice_columns(tuple(slices), width, delta.device))
    return y.index_add_(0, groups.token_ids, delta)


@functools.cache
def _slice_columns(slices: tuple[tuple[int, int], ...], width: int, device: torch.device) -> torch.Tensor:
    """Columns of the per-slice [n_slices x width] delta that land in y's [out] columns, in y's order."""
    return torch.cat([index * width + torch.arange(size) for index, (_, size) in enumerate(slices)]).to(device)
