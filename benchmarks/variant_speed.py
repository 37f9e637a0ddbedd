"""Decode speed of named variants (tokenmill with given flags, llama.cpp with a given GGUF), interleaved rounds.

Where `cpu_peers.py` compares one dtype across systems, this compares arbitrary variants of one model, as
the quantization issue asks (tokenmill bfloat16 vs int8 vs int4 vs llama.cpp Q8_0 / Q4_1), and prints the
ratios asked for. Each round runs every variant once, in order, each a fresh process (BENCHMARKS.md):

    PYTHONPATH=$PWD python benchmarks/variant_speed.py --batch-sizes 1,32 --rounds 3 \\
        --variant "bf16=tokenmill:--model /work/models/smollm2-135m --dtype bfloat16" \\
        --variant "int8=tokenmill:--model /work/models/smollm2-135m --dtype bfloat16 --quantization int8" \\
        --variant "llama.cpp Q8_0=llamacpp:/work/models/smollm2-q8_0.gguf" \\
        --ratio int8/bf16 --ratio "int8/llama.cpp Q8_0"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.cpu_peers import DEFAULT_BIN, run_process  # noqa: E402
from benchmarks.peer_commands import llamacpp_command, parse_llamacpp, parse_tokenmill  # noqa: E402


def parse_variant(spec: str) -> tuple[str, str, str]:
    """'LABEL=tokenmill:FLAGS' or 'LABEL=llamacpp:GGUF' -> (label, kind, rest)."""
    label, sep, rest = spec.partition("=")
    kind, colon, value = rest.partition(":")
    if not sep or not colon or kind not in ("tokenmill", "llamacpp") or not label or not value:
        raise SystemExit(f"error: --variant takes LABEL=tokenmill:FLAGS or LABEL=llamacpp:GGUF, got {spec!r}")
    return label, kind, value


def ratio_lines(figures: dict[int, dict[str, list[float]]], ratios: list[tuple[str, ...]]) -> list[str]:
    """Per pair A/B and batch size: the median of the per-round ratios (rounds ran side by side)."""
    lines = []
    for a, b_label in ratios:
        for batch_size, by_label in figures.items():
            per_round = [x / y for x, y in zip(by_label[a], by_label[b_label])]
            lines.append(f"batch {batch_size}: {a} / {b_label} = {statistics.median(per_round):.2f}x median "
                         f"(rounds {', '.join(f'{r:.2f}' for r in per_round)})")
    return lines


def run_variant(kind: str, value: str, batch_size: int, args: argparse.Namespace, env: dict[str, str],
                workdir: Path) -> float:
    if kind == "llamacpp":
        command = llamacpp_command(args.llamacpp_bin, value, batch_size, args.input_len, args.output_len, args.threads)
        return parse_llamacpp(run_process(command, env, args.timeout), batch_size, args.input_len,
                              args.output_len).tok_per_s
    out = workdir / "tokenmill.json"
    command = [args.python, "-m", "tokenmill", "bench", "latency", "--device", "cpu", "--batch-size", str(batch_size),
               "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--runs", "1",
               "--json", str(out), *shlex.split(value)]
    run_process(command, env, args.timeout)
    return parse_tokenmill(json.loads(out.read_text())).tok_per_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="LABEL=tokenmill:FLAGS | LABEL=llamacpp:GGUF")
    parser.add_argument("--ratio", action="append", default=[], help="A/B: the per-round ratio of two labels")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llamacpp-bin", type=Path, default=DEFAULT_BIN)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", dest="json_path", type=Path, default=Path(tempfile.gettempdir()) / "variant_speed.json")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    labels = [label for label, _, _ in variants]
    ratios = [tuple(r.split("/", 1)) for r in args.ratio]
    for pair in ratios:
        if len(pair) != 2 or any(p not in labels for p in pair):
            raise SystemExit(f"error: --ratio takes A/B of two variant labels ({', '.join(labels)}), got {'/'.join(pair)!r}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "PYTHONPATH": path}

    figures: dict[int, dict[str, list[float]]] = {b: {label: [] for label in labels} for b in batch_sizes}
    with tempfile.TemporaryDirectory(prefix="variant-speed-") as workdir:
        for batch_size in batch_sizes:
            for round_index in range(args.rounds):
                for label, kind, value in variants:
                    tok_s = run_variant(kind, value, batch_size, args, env, Path(workdir))
                    figures[batch_size][label].append(tok_s)
                    print(f"round {round_index + 1}/{args.rounds}  batch {batch_size}  {label:<24} {tok_s:,.1f} tok/s",
                          file=sys.stderr, flush=True)
    print(f"\n{args.input_len} prompt + {args.output_len} new tokens, {args.threads} threads, decode tok/s, "
          f"medians of {args.rounds} interleaved rounds\n")
    print("| batch | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
    for b in batch_sizes:
        print(f"| {b} | " + " | ".join(f"{statistics.median(figures[b][label]):,.1f}" for label in labels) + " |")
    for line in ratio_lines(figures, ratios):
        print(line)
    args.json_path.write_text(json.dumps({"variants": args.variant, "figures": figures,
                                          "input_len": args.input_len, "output_len": args.output_len}, indent=2))
    print(f"\nwrote {args.json_path}")


if __name__ == "__main__":
    main()
