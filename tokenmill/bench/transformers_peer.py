"""The transformers peer: greedy `generate` on the same weights, timed the way the latency recipe times decode.

Run by `tokenmill bench latency --peer transformers`, and as its own process by benchmarks/cpu_peers.py:
    python -m tokenmill.bench.transformers_peer --model DIR --dtype bfloat16 --batch-size 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.models.gguf import is_gguf_path


@dataclass
class PeerResult:
    batch_size: int
    input_len: int
    output_len: int
    tok_per_s: float  # decode tok/s of the whole batch after every sequence has its first token (median run)
    ttft_s: float  # prefill + first token of the whole batch (median run)
    runs_tok_per_s: list[float]


def time_transformers_generate(
    model_path: str, load_format: str, dtype: torch.dtype, device: torch.device, input_len: int, output_len: int,
    batch_size: int = 1, runs: int = 1, seed: int = 0,
) -> PeerResult:
    """Greedy generate of `batch_size` random prompts of `input_len` tokens, `output_len` new tokens each.

    Decode-only like llama-batched-bench's S_TG: a generate of one new token (prefill + first token) is
    timed too, and its time taken from the full generate's; what is left produced batch x (output_len - 1)
    tokens. The prompts have equal lengths, so no padding is needed. One warm-up, then the median of `runs`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "random":
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=dtype)
    elif is_gguf_path(model_path):  # transformers reads the same file
        path = Path(model_path)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, input_len), generator=generator).to(device)

    def generate(new_tokens: int) -> Callable[[], Any]:
        # min_new_tokens keeps an EOS from ending a row early, so every row makes exactly new_tokens.
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      min_new_tokens=new_tokens, max_new_tokens=new_tokens)

    samples: list[tuple[float, float]] = []
    with torch.no_grad():
        generate(2)()  # warm-up
        for _ in range(runs):
            first = _timed(generate(1), device)
            total = _timed(generate(output_len), device)
            samples.append((batch_size * (output_len - 1) / max(total - first, 1e-9), first))
    return PeerResult(batch_size, input_len, output_len, tok_per_s=statistics.median(s[0] for s in samples),
                      ttft_s=statistics.median(s[1] for s in samples), runs_tok_per_s=[s[0] for s in samples])


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    from tokenmill.config import DTYPES

    parser = argparse.ArgumentParser(description="time transformers greedy generate (decode tok/s, TTFT)")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write the result here (else stdout)")
    args = parser.parse_args(argv)
    result = time_transformers_generate(args.model, "auto", getattr(torch, args.dtype), torch.device(args.device),
                                        args.input_len, args.output_len, args.batch_size, args.runs, args.seed)
    text = json.dumps({"system": "transformers", "dtype": args.dtype, "threads": torch.get_num_threads(),
                       "result": asdict(result)}, indent=2)
    if args.json_path:
        Path(args.json_path).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
