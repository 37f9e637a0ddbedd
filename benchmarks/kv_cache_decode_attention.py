"""One layer's decode attention (store + read) through the torch backend, with a bfloat16, int8 or fp8 cache.

What the quantized cache costs or saves per decode step on the CPU: the store quantizes the step's keys and
values, the read gathers half the bytes and dequantizes them. SmolLM2's layout (9 query / 3 KV heads of 64).

    PYTHONPATH=$PWD python benchmarks/kv_cache_decode_attention.py            # the figures
    PYTHONPATH=$PWD python benchmarks/kv_cache_decode_attention.py --quick    # tiny shapes: does it run

Prints microseconds per call (median, 2 threads) per cache dtype, sequences x context and block layout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `tokenmill` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from tokenmill.attention.metadata import build_attention_metadata  # noqa: E402
from tokenmill.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tokenmill.quant.kv_cache import SCALE_DTYPE, is_quantized_kv  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def median_us(fn: Callable[[], torch.Tensor], runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def decode_step(cache_dtype: torch.dtype, seqs: int, context: int, scattered: bool) -> Callable[[], torch.Tensor]:
    """A decode step of `seqs` sequences at `context` tokens over a filled cache; returns the call to time."""
    blocks_each = -(-(context + 1) // BLOCK)
    num_blocks = seqs * blocks_each + 1
    order = torch.randperm(num_blocks - 1).tolist() if scattered else list(range(num_blocks - 1))
    tables = [order[i * blocks_each : (i + 1) * blocks_each] for i in range(seqs)]
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM).to(cache_dtype)
    scales = torch.rand(2, num_blocks, BLOCK, KV_HEADS).to(SCALE_DTYPE) if is_quantized_kv(cache_dtype) else None
    metadata = build_attention_metadata([context] * seqs, [1] * seqs, tables, BLOCK, torch.device("cpu"))
    q = torch.randn(seqs, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    k, v = (torch.randn(seqs, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
    backend = TorchAttentionBackend()

    def step() -> torch.Tensor:
        metadata.plans.clear()  # each layer of a real step reuses the plan; here every call is a fresh step
        return backend.forward(q, k, v, cache, metadata, HEAD_DIM**-0.5, None, kv_scales=scales)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few runs: check that it runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cases = [(1, 64), (2, 40)] if args.quick else [(1, 128), (1, 2128), (32, 240), (32, 1024)]
    runs = 3 if args.quick else 50
    print("| cache | sequences x context | blocks | us per layer |\n|---|---|---|---|")
    for name, dtype in CACHE_DTYPES.items():
        for seqs, context in cases:
            for scattered in (False, True):
                step = decode_step(dtype, seqs, context, scattered)
                print(f"| {name} | {seqs} x {context} | {'scattered' if scattered else 'in order'} | "
                      f"{median_us(step, runs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
