"""The ways to run a decode step's matrix products on CPU, measured on SmolLM2-135M's shapes.

A stack of 30 layers of SmolLM2's projections (fused QKV 960x576, output 576x576, fused gate-up 3072x576,
down 576x1536) plus its 49152x576 LM head, run at batch B in three ways, each in a fresh process since
inductor's settings are global:

- `aten`: F.linear on the plain weight (MKL in float32, oneDNN's unpacked path in bfloat16);
- `onednn`: oneDNN's linear on weights reordered once into its blocked layout (what the engine's
  UnquantizedLinearMethod does in eager mode);
- `inductor`: torch.compile with freezing and max-autotune's C++ GEMM templates (what --compile does).

    PYTHONPATH=$PWD python benchmarks/linear_options.py [--batch 1] [--threads 2]

Prints milliseconds per pass and the weight bytes read per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

LAYERS = 30
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
HEAD = (49152, 576)
MODES = ("aten", "onednn", "inductor")


class LinearStack(torch.nn.Module):
    def __init__(self, dtype: torch.dtype, packed: bool) -> None:
        super().__init__()
        shapes = [s for _ in range(LAYERS) for s in SHAPES] + [HEAD]
        weights = [torch.randn(n, k).to(dtype) for n, k in shapes]
        self.bytes = sum(w.numel() * w.element_size() for w in weights)
        self.packed = packed
        if packed:  # oneDNN's blocked layout, made once; the original shape is still needed to call it
            self.weights = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
        else:
            self.weights = torch.nn.ParameterList(torch.nn.Parameter(w, requires_grad=False) for w in weights)

    def linear(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weights[i], None, "none", [], "")
        return F.linear(x, self.weights[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in range(LAYERS):
            base = 4 * layer
            qkv, out = self.linear(x, base), self.linear(x, base + 1)
            gate_up = self.linear(x, base + 2)
            down = self.linear(gate_up[:, :1536], base + 3)
            x = x + 1e-3 * (down + out + qkv[:, :576])  # keep every product live
        return self.linear(x, len(SHAPES) * LAYERS)


def measure(mode: str, dtype: torch.dtype, batch: int) -> dict[str, float | str]:
    model = LinearStack(dtype, packed=mode == "onednn").eval()
    run = model
    if mode == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
        run = torch.compile(model, dynamic=False, mode="max-autotune-no-cudagraphs")
    x = torch.randn(batch, 576).to(dtype)
    with torch.inference_mode():
        for _ in range(3):
            run(x)
        times = []
        for _ in range(15):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"mode": mode, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "ms": round(seconds * 1e3, 2), "GB/s": round(model.bytes / seconds / 1e9, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)  # the child run
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], getattr(torch, args.one[1]), args.batch)))
        return
    print("| dtype | batch | mode | ms per pass | weight GB/s |\n|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        for mode in MODES:
            child = subprocess.run([sys.executable, __file__, "--one", mode, dtype, "--batch", str(args.batch),
                                    "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            row = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"| {row['dtype']} | {row['batch']} | {row['mode']} | {row['ms']} | {row['GB/s']} |", flush=True)


if __name__ == "__main__":
    main()
