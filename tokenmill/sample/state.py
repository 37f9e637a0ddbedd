"""One request's sampling state, kept by the worker from the request's first step until it finishes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.sample.thinking_budget import ThinkingBudgetTracker
from tokenmill.sampling_params import SamplingParams


@dataclass
class SamplingState:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    grammar: Any = None  # a structured-output matcher (GrammarMatcherLike), advanced with every emitted token
    thinking: ThinkingBudgetTracker | None = None


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator
