"""Multi-LoRA throughput on the CPU: 32 requests spread over 8 adapters and the base model, against the same 32
requests on the base model alone (an engine without LoRA). Interleaved rounds (ABBA), medians, the ratio.

Adapters are random PEFT folders written here (rank --rank, every projection q/k/v/o/gate/up/down targeted, B
non-zero) for the model's shapes; --max-loras 8 keeps all eight resident, so a step mixes all of them. Each
timed run is one `LLM.generate` of the 32 requests (prompt --input-len random tokens, --output-len greedy tokens,
EOS ignored); throughput counts generated tokens over its wall time, and over the process's CPU time too (on a
machine shared with other work, the wall time also counts the time others held the cores; with --threads 1 the
CPU time is the work itself). The base-model requests of the mixed batch
must produce exactly what the base engine produces (checked every round). Both engines run eagerly (an engine
with LoRA always does; the base engine is given --no-compile to compare the same forward).

    PYTHONPATH=$PWD python benchmarks/lora_mixed_batch.py --model models/tokenmill-py-13m --json lora.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `tokenmill` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: Path, config: dict, rank: int, seed: int) -> None:
    """A random PEFT LoRA folder for a Llama-shaped model config (as get_peft_model + save_pretrained write it)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config.get("num_key_value_heads",
                                                                 config["num_attention_heads"]) * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name in TARGETS:
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            fan_in, fan_out = shapes[name]
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * (0.3 / rank ** 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none"}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tokenmill-py-13m"))
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto", help="random: random weights of the folder's config.json")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = json.loads((Path(args.model) / "config.json").read_text())
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(8, config["vocab_size"]) for _ in range(args.input_len)]}
               for _ in range(args.requests)]
    # Request i runs adapter i % (adapters + 1); the last of each cycle runs the base model.
    names = [None if i % (args.adapters + 1) == args.adapters else f"a{i % (args.adapters + 1)}"
             for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True)
    common = dict(dtype=args.dtype, load_format=args.load_format, max_model_len=args.input_len + args.output_len + 16,
                  max_num_seqs=args.requests, compile=False)
    with tempfile.TemporaryDirectory() as tmp:
        modules = []
        for index in range(args.adapters):
            write_adapter(Path(tmp) / f"a{index}", config, args.rank, seed=index)
            modules.append(f"a{index}={Path(tmp) / f'a{index}'}")
        engines = {"lora": LLM(args.model, enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank,
                               lora_modules=modules, **common),
                   "base": LLM(args.model, **common)}
        runs: dict[str, list[float]] = {"lora": [], "base": []}
        cpu_runs: dict[str, list[float]] = {"lora": [], "base": []}
        for round_index in range(-1, args.rounds):  # round -1 warms both engines up and is not counted
            outputs = {}
            for mode in ("lora", "base") if round_index % 2 == 0 else ("base", "lora"):
                started, cpu_started = time.perf_counter(), time.process_time()
                outputs[mode] = engines[mode].generate(prompts, params,
                                                       lora_name=names if mode == "lora" else None)
                seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
                if round_index >= 0:
                    runs[mode].append(args.requests * args.output_len / seconds)
                    cpu_runs[mode].append(args.requests * args.output_len / cpu_seconds)
            for index, name in enumerate(names):
                if name is None and outputs["lora"][index].outputs[0].token_ids != \
                        outputs["base"][index].outputs[0].token_ids:
                    raise SystemExit(f"request {index} (base model) differs between the two engines")
            adapted = {tuple(outputs["lora"][i].outputs[0].token_ids) for i, n in enumerate(names) if n is not None}
            if len(adapted) < args.adapters:  # the adapters must matter, each its own way
                raise SystemExit("the adapters' outputs are not distinct: the adapters did not apply")
    medians = {mode: statistics.median(values) for mode, values in runs.items()}
    cpu_medians = {mode: statistics.median(values) for mode, values in cpu_runs.items()}
    report = {"model": args.model, "requests": args.requests, "adapters": args.adapters, "rank": args.rank,
              "input_len": args.input_len, "output_len": args.output_len, "threads": torch.get_num_threads(),
              "runs_tok_per_s": runs, "median_tok_per_s": medians,
              "ratio_lora_over_base": medians["lora"] / medians["base"],
              "cpu_time_runs_tok_per_s": cpu_runs, "cpu_time_median_tok_per_s": cpu_medians,
              "cpu_time_ratio_lora_over_base": cpu_medians["lora"] / cpu_medians["base"]}
    print("| engine | median tok/s (wall) | runs | median tok/s (CPU time) | runs |\n|---|---|---|---|---|")
    for mode in ("base", "lora"):
        print(f"| {mode} | {medians[mode]:.1f} | {', '.join(f'{v:.0f}' for v in runs[mode])} | "
              f"{cpu_medians[mode]:.1f} | {', '.join(f'{v:.0f}' for v in cpu_runs[mode])} |")
    print(f"lora / base: {report['ratio_lora_over_base']:.3f} (wall), "
          f"{report['cpu_time_ratio_lora_over_base']:.3f} (CPU time)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
