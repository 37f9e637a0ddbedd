"""Perplexity of one model with each KV-cache dtype, on held-out English or code shipped with Python.

The text is `pydoc_data.topics` (Python's own help topics, in every CPython install) or, with --text python,
the source of the standard library's argparse.py. It is tokenized once and cut into windows of --tokens
tokens; each window is one prompt whose prompt logprobs give its negative log-likelihood. The same windows
run through an engine per --kv-cache-dtypes value; the first is the reference the others are compared with
(docs/kv_cache_quantization.md).

    PYTHONPATH=$PWD python benchmarks/kv_cache_accuracy.py --model smollm2-135m-instruct --dtype bfloat16 \\
        --tokens 1024 --windows 2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `tokenmill` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from tokenmill import LLM, SamplingParams  # noqa: E402


def held_out_text(kind: str) -> str:
    if kind == "python":
        return Path(argparse.__file__).read_text()
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[name] for name in sorted(topics.topics))


def windows_of(token_ids: list[int], tokens: int, count: int) -> list[list[int]]:
    if len(token_ids) < tokens * count:
        raise SystemExit(f"the text has {len(token_ids)} tokens, fewer than --tokens x --windows = {tokens * count}")
    return [token_ids[i * tokens : (i + 1) * tokens] for i in range(count)]


def perplexity(llm: LLM, windows: list[list[int]]) -> float:
    """exp(mean negative logprob) of every token after the first of each window."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params)
    nll = [-out.prompt_logprobs[i][token].logprob for out, w in zip(outputs, windows)
           for i, token in enumerate(w) if i > 0]
    return math.exp(sum(nll) / len(nll))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder, .gguf file or catalog name")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--text", choices=("english", "python"), default="english",
                        help="pydoc_data.topics or the source of argparse.py")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per window")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--kv-cache-dtypes", default="auto,int8,fp8",
                        help="comma-separated; the first is the reference")
    args = parser.parse_args(argv)
    kv_dtypes = args.kv_cache_dtypes.split(",")
    windows: list[list[int]] | None = None
    results: dict[str, float] = {}
    for kv in kv_dtypes:
        blocks = args.windows * -(-(args.tokens + 1) // 16) + 1  # every window's KV at once, and no more
        llm = LLM(model=args.model, dtype=args.dtype, kv_cache_dtype=kv, max_model_len=args.tokens + 1,
                  num_kv_blocks=blocks, compile=False)
        if windows is None:
            tokenizer = llm.get_tokenizer()
            if tokenizer is None:
                raise SystemExit(f"{args.model} has no tokenizer to encode the text with")
            windows = windows_of(tokenizer.encode(held_out_text(args.text)), args.tokens, args.windows)
        results[kv] = perplexity(llm, windows)
    reference = results[kv_dtypes[0]]
    source = "argparse.py" if args.text == "python" else "pydoc_data.topics"
    print(f"{args.model} ({args.dtype}), {args.windows} x {args.tokens} tokens of {source}")
    print("| KV cache | perplexity | vs " + kv_dtypes[0] + " |\n|---|---|---|")
    for kv, value in results.items():
        print(f"| {kv} | {value:.4f} | {100 * (value / reference - 1):+.2f} % |")
    return results


if __name__ == "__main__":
    main()
