"""The torch attention backend against attention computed naively in float64, for every path it takes.

Paths: one decode on consecutive blocks (read in place), decodes gathered from scattered pages, decodes of
different lengths (masked), draft verification (several queries), a prompt's first chunk (causal over its
own keys) and a later chunk over the cache, mixed in one step, with and without a sliding window, with and
without soft-capped scores (Gemma 2), which take a plain matmul-softmax path instead of SDPA.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.attention.metadata import build_attention_metadata
from tokenmill.attention.torch_backend import TorchAttentionBackend

BLOCK, HEADS, KV_HEADS, DIM, NUM_BLOCKS = 16, 6, 2, 32, 64


def naive(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, window: int | None,
          softcap: float | None = None) -> torch.Tensor:
    """q [n, H, D] at positions start.., keys/values [L, KVH, D] of positions 0..L-1 -> [n, H, D] in float64."""
    group = HEADS // KV_HEADS
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        pos = start + i
        for h in range(HEADS):
            k = keys[: pos + 1, h // group].double()
            v = values[: pos + 1, h // group].double()
            scores = (k @ q[i, h].double()) / math.sqrt(DIM)
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            if window is not None:
                scores[: max(pos + 1 - window, 0)] = float("-inf")
            out[i, h] = torch.softmax(scores, dim=0) @ v
    return out


def run_step(chunks: list[tuple[int, int, list[int]]], window: int | None, dtype: torch.dtype, seed: int,
             softcap: float | None = None):
    """chunks: (start position, new tokens, block table). Returns (backend output, expected) for the step."""
    generator = torch.Generator().manual_seed(seed)
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM, dtype=dtype)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start, _, table in chunks:  # the context before this step, already in the cache
        keys = torch.randn(start, KV_HEADS, DIM, generator=generator).to(dtype)
        values = torch.randn(start, KV_HEADS, DIM, generator=generator).to(dtype)
        for pos in range(start):
            block, offset = table[pos // BLOCK], pos % BLOCK
            cache[0, block, offset], cache[1, block, offset] = keys[pos], values[pos]
        history.append((keys, values))
    total = sum(n for _, n, _ in chunks)
    q = torch.randn(total, HEADS, DIM, generator=generator).to(dtype)
    k = torch.randn(total, KV_HEADS, DIM, generator=generator).to(dtype)
    v = torch.randn(total, KV_HEADS, DIM, generator=generator).to(dtype)
    metadata = build_attention_metadata([c[0] for c in chunks], [c[1] for c in chunks], [c[2] for c in chunks],
                                        BLOCK, torch.device("cpu"))
    out = TorchAttentionBackend().forward(q, k, v, cache, metadata, DIM**-0.5, window, softcap)
    expected, row = [], 0
    for (start, count, _), (keys, values) in zip(chunks, history):
        all_keys = torch.cat([keys, k[row : row + count]])
        all_values = torch.cat([values, v[row : row + count]])
        expected.append(naive(q[row : row + count], all_keys, all_values, start, window, softcap))
        row += count
    return out, torch.cat(expected)


STEPS = {
    "one decode, consecutive blocks": [(40, 1, [3, 4, 5])],
    "one decode, scattered blocks": [(40, 1, [9, 2, 30])],
    "decodes of different lengths": [(40, 1, [9, 2, 30]), (17, 1, [11, 12]), (5, 1, [7])],
    "verification of drafts": [(33, 4, [20, 21, 40]), (20, 3, [1, 13])],
    "first chunk of a prompt": [(0, 40, [14, 15, 16])],
    "later chunk of a prompt": [(24, 30, [50, 51, 52, 53])],
    "mixed step": [(0, 20, [30, 31]), (40, 1, [9, 2, 35]), (33, 3, [40, 41, 42]), (16, 25, [44, 45, 46])],
}


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("name", list(STEPS))
def test_every_path_matches_naive_attention(name: str, window: int | None, softcap: float | None) -> None:
    out, expected = run_step(STEPS[name], window, torch.float32, seed=len(name), softcap=softcap)
    assert out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_soft_capping_changes_the_output() -> None:
    """The cap is applied, not ignored: uncapped attention is far from the capped oracle."""
    capped, expected = run_step(STEPS["mixed step"], None, torch.float32, seed=3, softcap=1.5)
    plain, _ = run_step(STEPS["mixed step"], None, torch.float32, seed=3)
    assert (capped.double() - expected).abs().max().item() < 1e-5
    assert (plain.double() - expected).abs().max().item() > 1e-2


def test_bfloat16_decode_stays_close() -> None:
    out, expected = run_step(STEPS["decodes of different lengths"], None, torch.bfloat16, seed=7)
    assert (out.double() - expected).abs().max().item() < 3e-2


def test_the_step_stores_its_keys_and_values_at_their_slots() -> None:
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    metadata = build_attention_metadata([18, 0], [1, 2], [[5, 8], [40]], BLOCK, torch.device("cpu"))
    k, v = torch.randn(3, KV_HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    TorchAttentionBackend().forward(torch.randn(3, HEADS, DIM), k, v, cache, metadata, 1.0, None)
    assert torch.equal(cache[0, 8, 2], k[0]) and torch.equal(cache[1, 8, 2], v[0])  # position 18: block 8, slot 2
    assert torch.equal(cache[0, 40, :2], k[1:]) and torch.equal(cache[1, 40, :2], v[1:])
    assert int((cache != 0).sum()) == 3 * 2 * KV_HEADS * DIM  # nothing else was written
