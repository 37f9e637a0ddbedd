"""SamplingParams: how one request is sampled and when it stops, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.errors import InvalidRequestError
from tokenmill.input_checks import check_text
from tokenmill.structured.params import StructuredOutputParams

# Bounds shared with the server so both report the same limits.
MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP_STRINGS = 32
# What each of a request's outputs carries (vLLM calls this RequestOutputKind):
#   cumulative  everything so far, after every step that changed the request;
#   delta       only what is new since the request's previous output (prompt fields in the first one);
#   final_only  nothing until the request finishes, then the whole result once.
OUTPUT_KINDS = ("cumulative", "delta", "final_only")
TOP_K_OFF = -1  # the one negative top_k accepted (vLLM's "off"); 0 means off as well


@dataclass
class SamplingParams:
    """Per-request sampling and stopping parameters (the names follow vLLM / OpenAI).

    temperature 0 means greedy. top_k 0 (or -1, vLLM's spelling) and top_p = 1 and min_p = 0 disable those
    filters; any other top_k must be in [1, vocabulary size].
    `logprobs` = N returns the chosen token's logprob plus the top N; `prompt_logprobs` likewise for
    every prompt token after the first.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Hard reasoning budget: after this many tokens inside a thinking section the engine forces
    # `thinking_end_token_ids` (e.g. a short wrap-up message and "</think>"), so the answer always comes.
    # Left empty, the three fields below are filled by the engine from its tokenizer and EngineConfig.thinking.
    thinking_token_budget: int | None = None
    thinking_start_token_id: int | None = None
    thinking_end_token_ids: list[int] = field(default_factory=list)
    starts_in_thinking: bool = False  # the prompt (chat template) already opened the section
    # Structured output: a JSON schema / JSON object / regex / choice / grammar the output must match,
    # enforced by a token mask at every step.
    structured_outputs: StructuredOutputParams | None = None
    output_kind: str = "cumulative"  # one of OUTPUT_KINDS; LLM.generate / LLM.stream set their own
    # Filled by the engine: the checkpoint's EOS ids (config + generation_config).
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first field that is out of range.

        vocab_size (known to the engine, not to a client building params) bounds top_k: a larger value would
        overflow the sampler's tensors inside a step shared with other requests."""
        _check_int("n", self.n, 1, MAX_N)
        _check_float("temperature", self.temperature, ">= 0", lambda v: v >= 0.0)
        _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_int("top_k", self.top_k, None, vocab_size)
        if self.top_k < 0 and self.top_k != TOP_K_OFF:
            raise InvalidRequestError("top_k", f"must be 0 or {TOP_K_OFF} (off), or >= 1, got {self.top_k}")
        _check_float("min_p", self.min_p, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0.0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), "in [-2, 2]", lambda v: -2.0 <= v <= 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**63 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", f"stop strings must be non-empty strings, got {s!r}")
            check_text(s, "stop")
        for t in self.stop_token_ids:  # min_tokens masks them in the logits: an id past the vocabulary would overflow
            _check_int("stop_token_ids", t, 0, None if vocab_size is None else vocab_size - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputParams):
                raise InvalidRequestError("structured_outputs", "must be a StructuredOutputParams")
            self.structured_outputs.validate()
        if self.output_kind not in OUTPUT_KINDS:
            raise InvalidRequestError(
                "output_kind", f"must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}"
            )
        if self.thinking_token_budget is not None:
            _check_int("thinking_token_budget", self.thinking_token_budget, 0, None)
        for t in self.thinking_end_token_ids:
            _check_int("thinking_end_token_ids", t, 0, None)


def _check_float(name: str, value: object, rule: str, holds: Callable[[float], bool]) -> None:
    # Infinity and NaN arrive from JSON (`1e999`, Python's `NaN` literal) and would poison a whole batch.
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value) or not holds(float(value)):
        raise InvalidRequestError(name, f"must be a finite number {rule}, got {value}")


def _check_int(name: str, value: object, low: int | None, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")
    if low is not None and value < low:
        raise InvalidRequestError(name, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidRequestError(name, f"must be <= {high}, got {value}")
