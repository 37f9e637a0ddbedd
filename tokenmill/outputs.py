"""What users get back: RequestOutput with one CompletionOutput per sample (vLLM's names).

What an output holds depends on the request's `SamplingParams.output_kind`: everything so far
("cumulative", "final_only"), or only what is new since the request's previous output ("delta"). A delta
output lists only the samples that changed; its prompt fields are filled only in the request's first
output (later ones have prompt None, prompt_token_ids [] and prompt_logprobs None). `cumulative_logprob`,
`spec_decoding`, `num_cached_tokens` and `metrics` are always totals as of that output.
"""

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
    # Engine clock (time.monotonic, comparable only with each other): arrival_time, first_token_time.
    metrics: dict[str, float] = field(default_factory=dict)


def merge_deltas(deltas: list[RequestOutput]) -> RequestOutput:
    """One delta output equal to `deltas` (consecutive outputs of one request) applied in order.

    Pieces are gathered first and joined once, so merging k outputs costs O(their size), not O(k * size).
    """
    if len(deltas) == 1:
        return deltas[0]
    first, last = deltas[0], deltas[-1]
    texts: dict[int, list[str]] = {}
    ids: dict[int, list[int]] = {}
    logprobs: dict[int, list[LogprobsDict]] = {}
    latest: dict[int, CompletionOutput] = {}
    for delta in deltas:
        for completion in delta.outputs:
            i = completion.index
            texts.setdefault(i, []).append(completion.text)
            ids.setdefault(i, []).extend(completion.token_ids)
            if completion.logprobs is not None:
                logprobs.setdefault(i, []).extend(completion.logprobs)
            latest[i] = completion
    outputs = [
        CompletionOutput(
            index=i,
            text="".join(texts[i]),
            token_ids=ids[i],
            finish_reason=latest[i].finish_reason,
            stop_reason=latest[i].stop_reason,
            logprobs=logprobs.get(i),
            cumulative_logprob=latest[i].cumulative_logprob,
            spec_decoding=latest[i].spec_decoding,
        )
        for i in sorted(latest)
    ]
    prompt_source = next((d for d in deltas if d.prompt_token_ids), first)
    return RequestOutput(
        request_id=last.request_id,
        prompt=prompt_source.prompt,
        prompt_token_ids=prompt_source.prompt_token_ids,
        outputs=outputs,
        finished=last.finished,
        num_cached_tokens=last.num_cached_tokens,
        prompt_logprobs=prompt_source.prompt_logprobs,
        metrics=last.metrics,
    )
