"""Asynchronous scheduling on and off: the `tokenmill bench latency` recipe, interleaved, medians and ratios.

For each batch size both engines are built once (same weights, same settings but --async-scheduling), then
a warm-up round, then R rounds of off, on / on, off (alternating), each one `run_latency` call with one timed
run after its own warm-up run. Prints a markdown table of median decode tok/s and on / off, and writes every
run's figures as JSON.

    PYTHONPATH=$PWD python benchmarks/async_scheduling.py --model models/tokenmill-py-13m --batch-sizes 1 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `tokenmill` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from tokenmill.bench.recipes import run_latency  # noqa: E402
from tokenmill.bench.roofline import measure_bandwidth  # noqa: E402
from tokenmill.engine.engine import LLMEngine  # noqa: E402
from tokenmill.engine_args import EngineArgs  # noqa: E402


def engine(model: str, device: str, async_scheduling: bool, batch_size: int, max_model_len: int) -> LLMEngine:
    args = EngineArgs(model=model, device=device, async_scheduling=async_scheduling, max_model_len=max_model_len,
                      max_num_seqs=max(batch_size, 1))
    return LLMEngine(args.create_engine_config())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tokenmill-py-13m"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report: dict = {"model": args.model, "device": args.device, "input_len": args.input_len,
                    "output_len": args.output_len, "batch_sizes": {}}
    max_model_len = args.input_len + args.output_len + 16
    for batch_size in args.batch_sizes:
        engines = {mode: engine(args.model, args.device, mode == "on", batch_size, max_model_len)
                   for mode in ("off", "on")}
        bandwidth = measure_bandwidth(engines["off"].device)
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for round_index in range(-1, args.rounds):  # round -1 warms both engines up and is not counted
            # ABBA order: neither mode always runs first (caches, a neighbour's load that comes and goes).
            for mode in ("off", "on") if round_index % 2 == 0 else ("on", "off"):
                result = run_latency(engines[mode], input_len=args.input_len, output_len=args.output_len,
                                     batch_size=batch_size, runs=1, seed=round_index, bandwidth=bandwidth)
                if round_index >= 0:
                    runs[mode].append(result.tok_per_s)
        medians = {mode: statistics.median(values) for mode, values in runs.items()}
        report["batch_sizes"][batch_size] = {"runs_tok_per_s": runs, "median_tok_per_s": medians,
                                             "ratio_on_over_off": medians["on"] / medians["off"]}
        for built in engines.values():
            built.close()
    print("| batch | off tok/s | on tok/s | on / off |\n|---|---|---|---|")
    for batch_size, row in report["batch_sizes"].items():
        medians = row["median_tok_per_s"]
        print(f"| {batch_size} | {medians['off']:.1f} | {medians['on']:.1f} | {row['ratio_on_over_off']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
