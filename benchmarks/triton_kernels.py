"""Speed of the Triton attention kernels on a GPU: paged decode (split-KV) as achieved KV bandwidth and paged
prefill as TFLOP/s, beside the torch backend on the same cache. Prints a markdown table and writes JSON.

    PYTHONPATH=$PWD python benchmarks/triton_kernels.py --out /tmp/kernels.json          # on a GPU
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/triton_kernels.py --tiny         # on a CPU: runs once

--tiny runs each kernel once at toy shapes (under the interpreter on a CPU) so the script cannot rot; its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `tokenmill` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from tokenmill.attention.metadata import build_attention_metadata  # noqa: E402
from tokenmill.attention.torch_backend import TorchAttentionBackend  # noqa: E402

# (name, heads, kv_heads, head_dim, batch, context, new tokens per sequence)
FULL = [
    ("llama3-8b decode b1 ctx4k", 32, 8, 128, 1, 4096, 1),
    ("llama3-8b decode b1 ctx32k", 32, 8, 128, 1, 32768, 1),
    ("llama3-8b decode b64 ctx2k", 32, 8, 128, 64, 2048, 1),
    ("qwen3-0.6b decode b1 ctx4k", 16, 8, 128, 1, 4096, 1),
    ("llama3-8b prefill 2k", 32, 8, 128, 1, 2048, 2048),
    ("llama3-8b verify b32 k4 ctx1k", 32, 8, 128, 32, 1024, 5),
]
TINY = [("tiny decode", 4, 2, 16, 2, 40, 1), ("tiny prefill", 4, 2, 16, 1, 24, 24)]


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of fn (CUDA events on a GPU, wall clock elsewhere)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=max(repeats, 20), return_mode="median") / 1e3
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_shape(shape: tuple, device: torch.device, dtype: torch.dtype, block_size: int, repeats: int) -> dict:
    from tokenmill.attention.triton_backend import TritonAttentionBackend

    name, heads, kv_heads, head_dim, batch, context, new = shape
    blocks_per_seq = -(-context // block_size)
    cache = torch.randn((2, batch * blocks_per_seq + 1, block_size, kv_heads, head_dim), device=device, dtype=dtype)
    tables = np.random.default_rng(0).permutation(batch * blocks_per_seq).reshape(batch, blocks_per_seq) + 1
    metadata = build_attention_metadata([context - new] * batch, [new] * batch, tables.tolist(), block_size, device)
    query = torch.randn((batch * new, heads, head_dim), device=device, dtype=dtype)
    key = torch.randn((batch * new, kv_heads, head_dim), device=device, dtype=dtype)
    row: dict[str, object] = {"name": name, "dtype": str(dtype).removeprefix("torch.")}
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        def attend() -> torch.Tensor:
            return backend.forward(query, key, key, cache, metadata, head_dim ** -0.5, None)

        attend()  # compile, and build the step's plan once, as the first layer of a step does
        row[f"{backend.name}_us"] = timed(attend, device, repeats) * 1e6
    kv_bytes = 2 * batch * context * kv_heads * head_dim * cache.element_size()
    flops = 4 * batch * heads * head_dim * new * (context - (new - 1) / 2)  # causal: the triangle of the chunk
    row["triton_kv_gb_s"] = kv_bytes / (row["triton_us"] * 1e-6) / 1e9
    row["triton_tflop_s"] = flops / (row["triton_us"] * 1e-6) / 1e12
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes, one run each (a CPU check)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    rows = [run_shape(s, device, dtype, args.block_size, 1 if args.tiny else 50) for s in (TINY if args.tiny else FULL)]
    print("| shape | triton µs | torch µs | KV GB/s | TFLOP/s |\n| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['triton_us']:.1f} | {r['torch_us']:.1f} | {r['triton_kv_gb_s']:.0f} | "
              f"{r['triton_tflop_s']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
