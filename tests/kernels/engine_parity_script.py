"""Greedy tokens of the whole engine with the torch and the triton attention backend (float32, CPU), printed
as JSON: run under TRITON_INTERPRET=1 by test_engine_triton_backend.py.

Scenarios: a batch of prompts at once (also with asynchronous scheduling); chunked prefill (a budget of 8 tokens per step); prefix hits (the same
prompts again with prefix caching); speculative verification (prompt-lookup drafts on repetitive prompts).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from tests.checkpoints import make_checkpoint
from tokenmill import LLM, SamplingParams

NEW_TOKENS = 12


def prompts() -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(8, 512) for _ in range(18)]  # a shared prefix: one full block of 16 and more
    return [shared + [rng.randrange(8, 512) for _ in range(n)] for n in (2, 5)] + [[rng.randrange(8, 512)]]


def repetitive() -> list[list[int]]:
    return [[11, 12, 13, 14, 15] * 4, [40, 41, 42] * 6]


def greedy(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in batch], params)]


def run(path: Path, backend: str) -> dict[str, object]:
    common = dict(model=str(path), dtype="float32", max_model_len=128, num_kv_blocks=64, attention_backend=backend)
    batched = LLM(**common, enable_prefix_caching=False)
    out: dict[str, object] = {"backend": batched.engine.worker.attention_backend.name}
    out["batched"] = greedy(batched, prompts())
    # Step n+1 planned while step n runs, its decode tokens gathered on the device (the default on CUDA).
    planned_ahead = LLM(**common, enable_prefix_caching=False, async_scheduling=True)
    out["async_scheduling"] = greedy(planned_ahead, prompts())
    chunked = LLM(**common, enable_prefix_caching=False, max_num_batched_tokens=8)
    out["chunked"] = greedy(chunked, prompts())
    cached = LLM(**common)
    greedy(cached, prompts())
    out["prefix_hit"] = greedy(cached, prompts())
    out["prefix_cached_tokens"] = max(o.num_cached_tokens for o in cached.generate(
        [{"prompt_token_ids": p} for p in prompts()], SamplingParams(temperature=0.0, max_tokens=1)))
    spec = LLM(**common, speculative_method="ngram", num_speculative_tokens=3, speculative_adaptive=False)
    out["speculative"] = greedy(spec, repetitive())
    stats = spec.engine.stats()
    out["spec_accepted"] = stats["spec_num_accepted_tokens"]
    return out


def main() -> None:
    """argv: the families to run; prints {family: {backend: scenarios}}."""
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for family in sys.argv[1:]:
            path = make_checkpoint(family, Path(folder) / family)
            results[family] = {backend: run(path, backend) for backend in ("torch", "triton")}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
