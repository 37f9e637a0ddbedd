"""What users get back: RequestOutput with one CompletionOutput per sample (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Per generated token: {token_id: Logprob}, holding the chosen token and the top-N.
LogprobsDict = dict[int, "Logprob"]


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[LogprobsDict] | None = None
    cumulative_logprob: float | None = None
    # Speculative decoding of this sample: acceptance_rate, mean_accepted_length, per_position_acceptance,
    # and the counts behind them (None when speculation is off).
    spec_decoding: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[LogprobsDict | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
