"""Shared fixtures: tiny checkpoints per family (built once per session) and transformers references."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.checkpoints import greedy_tokens, make_checkpoint

NUM_NEW_TOKENS = 64
PROMPT_LENGTHS = [1, 7, 16, 33, 64, 129, 200, 300]


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):
    """family -> checkpoint folder, built lazily and cached for the session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_checkpoint(family, tmp_path_factory.mktemp(family))
        return built[family]

    return get


def make_prompts(vocab_size: int = 512, seed: int = 0, lengths: list[int] = PROMPT_LENGTHS) -> list[list[int]]:
    """Random token prompts avoiding the special ids at the bottom of the tiny vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab_size) for _ in range(n)] for n in lengths]


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int = NUM_NEW_TOKENS) -> list[list[int]]:
    """transformers greedy generate, one prompt at a time (no padding), EOS suppressed for the length."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return greedy_tokens(model, prompts, max_new_tokens)


def hf_last_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, -1].float() for p in prompts]
