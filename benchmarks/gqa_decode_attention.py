"""Decode attention on CPU with grouped KV heads: SDPA's enable_gqa against folding the query heads that share
a KV head into its query rows (what tokenmill's torch backend does for one query per sequence).

    python benchmarks/gqa_decode_attention.py

Prints microseconds per call (median of 60, 2 threads) for SmolLM2's and Qwen2.5-0.5B's head layouts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = (("SmolLM2 9/3", 9, 3), ("Qwen2.5-0.5B 14/2", 14, 2))
CASES = ((1, 128), (1, 2128), (32, 240))  # (sequences, context tokens)
HEAD_DIM = 64


def median_us(fn: Callable[[], torch.Tensor], runs: int = 60) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    torch.set_num_threads(2)
    print("| heads / KV heads | dtype | sequences x context | enable_gqa us | folded us |\n|---|---|---|---|---|")
    for name, heads, kv_heads in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for seqs, context in CASES:
                q = torch.randn(seqs, heads, 1, HEAD_DIM, dtype=dtype)
                # The cache's layout: tokens outermost, heads inside, so K/V are strided views as in the engine.
                k = torch.randn(seqs, context, kv_heads, HEAD_DIM, dtype=dtype).transpose(1, 2)
                v = torch.randn(seqs, context, kv_heads, HEAD_DIM, dtype=dtype).transpose(1, 2)

                def gqa() -> torch.Tensor:
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                def folded() -> torch.Tensor:
                    rows = q.reshape(seqs, kv_heads, heads // kv_heads, HEAD_DIM)
                    return F.scaled_dot_product_attention(rows, k, v).reshape(q.shape)

                torch.testing.assert_close(folded(), gqa())
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {seqs} x {context} | "
                      f"{median_us(gqa):.0f} | {median_us(folded):.0f} |", flush=True)


if __name__ == "__main__":
    main()
