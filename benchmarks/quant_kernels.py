"""CPU quantized matmuls against dequantize-then-matmul and the float baseline, at SmolLM2-135M's shapes.

One decoder layer's projections (fused QKV 960x576, output 576x576, fused gate-up 3072x576, down 576x1536),
each run at batch 1 (decode) and 32 (a batch of decodes, or a prefill chunk), by every CPU path the quant
methods can take:

- `float`: F.linear on the weight in the activations' dtype; `float-onednn` (bfloat16 / float16): the same
  on oneDNN's prepacked layout, the unquantized engine's eager baseline;
- `int8pack`: aten._weight_int8pack_mm on int8 codes with per-channel scales (quant/int8.py);
- `int4pack`: aten._weight_int4pack_mm_for_cpu, group 64 (quant/int4.py; 576 is not a multiple of 128);
- `tiled-<method>`: the tiled dequantize-then-matmul (quant/cpu_kernels.py) for int8, int8 g32 (what a GGUF
  Q8_0 file loads as), int4 g64, w2 g64, fp8;
- `dequant+linear`: dequantize the whole int8 weight, then F.linear (what the tiled path avoids);
- `w8a8-fbgemm`: fbgemm's dynamic int8 linear (activations quantized per tensor on the fly), for comparison.

`--layers 30` runs 30 distinct copies of the layer per timed pass, so that the weights come from memory as
in a decode step rather than from the last-level cache.

    PYTHONPATH=$PWD python benchmarks/quant_kernels.py [--batch 1 32] [--dtype bfloat16] [--threads 2] [--layers 30]

Prints microseconds per layer (the four projections) per path and batch, the bytes each path's weights
take, and for int8 and int4 which path is faster at each batch. The methods run the packed kernels at every
batch size; where the tiled path wins at some batch, they should switch to it there.
`--tiny` shrinks the shapes and repetitions to check that the script runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenmill.quant.codes import QuantSpec, dequantize, quantize_rtn
from tokenmill.quant.cpu_kernels import (int4pack_matmul, int4pack_weight, int8_bf16_gemm, int8pack_matmul,
                                         tiled_dequant_matmul)

SMOLLM2_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
TINY_SHAPES = ((64, 128), (128, 64))
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

Matmul = Callable[[torch.Tensor], torch.Tensor]


def _paths(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[Matmul, int]]:
    """Path name -> (x -> x @ W.T, bytes of the weights it reads)."""
    paths: dict[str, tuple[Matmul, int]] = {}
    plain = weight.to(dtype)
    paths["float"] = (lambda x: F.linear(x, plain), plain.numel() * plain.element_size())
    # oneDNN refuses bfloat16 reorders on CPUs without AVX-512 (or AVX-NE-CONVERT): no prepacked path there.
    if dtype != torch.float32 and torch.backends.mkldnn.is_available() \
            and torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2"):
        # The engine's eager bfloat16 baseline: oneDNN's blocked layout (UnquantizedLinearMethod(prepack_cpu)).
        packed_float = torch.ops.mkldnn._reorder_linear_weight(plain, 1)
        paths["float-onednn"] = (lambda x: torch.ops.mkldnn._linear_pointwise(x, packed_float, None, "none", [], ""),
                                 plain.numel() * plain.element_size())

    int8 = QuantSpec("int8")
    q8, s8, _ = quantize_rtn(int8, weight)
    channel_scales = s8[:, 0].to(dtype).contiguous()
    paths["int8pack"] = (lambda x: int8pack_matmul(x, q8, channel_scales), q8.numel() + s8.numel() * 4)
    paths["tiled-int8"] = (lambda x: tiled_dequant_matmul(x, q8, s8, None, 8), q8.numel() + s8.numel() * 4)
    if dtype == torch.bfloat16:  # the bfloat16 GEMM on converted codes (chosen from 8 rows where bf16 is native)
        paths["int8-bf16-gemm"] = (lambda x: int8_bf16_gemm(x, q8, channel_scales), q8.numel() + s8.numel() * 4)
    paths["dequant+linear"] = (lambda x: F.linear(x, dequantize(int8, q8, s8).to(dtype)), q8.numel() + s8.numel() * 4)

    q8g, s8g, _ = quantize_rtn(QuantSpec("int8", 32), weight)  # GGUF Q8_0's layout: int8 in groups of 32
    paths["tiled-int8-g32"] = (lambda x: tiled_dequant_matmul(x, q8g, s8g, None, 8), q8g.numel() + s8g.numel() * 4)

    int4 = QuantSpec("int4", 64, True)
    q4, s4, z4 = quantize_rtn(int4, weight)
    assert z4 is not None
    packed, scales_and_zeros = int4pack_weight(q4, s4, z4, dtype)
    group_bytes = s4.numel() * 8
    paths["int4pack"] = (lambda x: int4pack_matmul(x, packed, 64, scales_and_zeros), packed.numel() + group_bytes)
    paths["tiled-int4"] = (lambda x: tiled_dequant_matmul(x, q4, s4, z4, 4), q4.numel() + group_bytes)

    w2 = QuantSpec("w2", 64, True)
    q2, s2, z2 = quantize_rtn(w2, weight)
    paths["tiled-w2"] = (lambda x: tiled_dequant_matmul(x, q2, s2, z2, 2), q2.numel() + s2.numel() * 8)

    # W8A8 measured for comparison, not used by the methods: fbgemm's dynamic linear quantizes the activations
    # per tensor (7 bits) on the fly, so its output is not the weight-only twin's.
    per_channel = torch.quantize_per_channel(weight, s8[:, 0].double(), torch.zeros(weight.shape[0], dtype=torch.long),
                                             0, torch.qint8)
    fbgemm = torch.ops.quantized.linear_prepack(per_channel, None)
    paths["w8a8-fbgemm"] = (lambda x: torch.ops.quantized.linear_dynamic(x.float(), fbgemm, True).to(dtype),
                            q8.numel() + s8.numel() * 4)

    q_fp8, s_fp8, _ = quantize_rtn(QuantSpec("fp8"), weight)
    paths["tiled-fp8"] = (lambda x: tiled_dequant_matmul(x, q_fp8, s_fp8, None, 8), q_fp8.numel() + s_fp8.numel() * 4)
    return paths


def _time(fn: Callable[[], object], iters: int) -> float:
    """Median seconds of one call over `iters` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(shapes: tuple[tuple[int, int], ...], batches: list[int], dtype: torch.dtype,
            iters: int, num_layers: int = 1) -> dict[int, dict[str, tuple[float, int]]]:
    """batch -> path -> (seconds for one layer's projections, weight bytes of that layer). With `num_layers`
    distinct copies of the layer, each timed pass runs all of them, so beyond the last-level cache the weights
    come from memory as in a decode step (one layer's alone stays cached and flatters every path)."""
    generator = torch.Generator().manual_seed(0)
    layers = [[_paths(torch.randn(n, k, generator=generator) * 0.02, dtype) for n, k in shapes]
              for _ in range(num_layers)]
    results: dict[int, dict[str, tuple[float, int]]] = {}
    for batch in batches:
        inputs = [torch.randn(batch, k, generator=generator).to(dtype) for _, k in shapes]

        def one_pass(name: str) -> None:
            for layer in layers:
                for paths, x in zip(layer, inputs):
                    paths[name][0](x)

        per_path: dict[str, tuple[float, int]] = {}
        for name in layers[0][0]:
            seconds = _time(lambda name=name: one_pass(name), iters) / num_layers
            per_path[name] = (seconds, sum(paths[name][1] for paths in layers[0]))
        results[batch] = per_path
    return results


def report(results: dict[int, dict[str, tuple[float, int]]]) -> list[str]:
    lines = []
    for batch, per_path in results.items():
        lines.append(f"batch {batch}:")
        base = per_path["float"][0]
        for name, (seconds, nbytes) in per_path.items():
            lines.append(f"  {name:<15} {seconds * 1e6:10.1f} us/layer  {nbytes / 1e6:7.2f} MB  "
                         f"{base / seconds:5.2f}x float")
        for method, packed, tiled in (("int8", "int8pack", "tiled-int8"), ("int4", "int4pack", "tiled-int4")):
            faster = packed if per_path[packed][0] <= per_path[tiled][0] else tiled
            lines.append(f"  {method}: {faster} is faster at batch {batch}")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--layers", type=int, default=1,
                        help="distinct copies of the layer run per timed pass (30: SmolLM2's decoder, from memory)")
    parser.add_argument("--tiny", action="store_true", help="small shapes and 2 repetitions: checks that it runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = TINY_SHAPES if args.tiny else SMOLLM2_SHAPES
    lines = report(measure(shapes, args.batch, DTYPES[args.dtype], 2 if args.tiny else args.iters, args.layers))
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
