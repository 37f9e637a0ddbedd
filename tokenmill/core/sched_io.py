"""The core <-> worker contract: plain dataclasses of ints and lists, nothing else crosses.

Each step the scheduler says, per request, "compute these tokens starting at this position, using these
KV blocks, and sample (or not) at the end". Prefill, chunked prefill, prefix-cache hits and decode are all
that one rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams

# Stands in token_ids for a token sampled by a step that has not finished when this one was planned.
PLACEHOLDER_TOKEN_ID = -1


@dataclass
class NewRequestData:
    """Sent the first time the worker sees a request: what it needs to sample for it."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class ScheduledChunk:
    """One request's share of the step.

    token_ids are the tokens at positions [start_pos, start_pos + len(token_ids)); block_table covers at
    least start_pos + len(token_ids) tokens. When `sample` is set the worker samples one token from the
    logits of the last position. `output_token_ids` are the request's generated tokens so far (for
    penalties); `prompt_logprobs_from` is set when the worker must return prompt logprobs for this chunk.
    """

    req_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    want_prompt_logprobs: bool = False
    # The last num_spec_tokens of token_ids are draft tokens to verify; the worker then returns the
    # accepted drafts plus one token from the target.
    num_spec_tokens: int = 0
    # The last of token_ids is PLACEHOLDER_TOKEN_ID: the token the worker sampled for this request in its
    # previous step, which the worker fills in itself (asynchronous scheduling; the chunk is one decode token).
    placeholder: bool = False
    # The worker slot of the request's LoRA adapter (core/lora_slots.py); -1: the base model.
    lora_slot: int = -1


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    new_requests: list[NewRequestData] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    # Requests recomputed after a preemption (their blocks changed): per-request worker caches reset.
    resumed_req_ids: list[str] = field(default_factory=list)
    # Requests still waiting after this step: the next step may well carry their prefill.
    num_waiting: int = 0
    # Wall time of the engine's previous step, scheduling to outputs (set by the engine, not the scheduler):
    # what the worker's measured-speed decisions (speculation on or off) judge that step by.
    prev_step_seconds: float | None = None
    # LoRA slots the worker fills before this step runs: slot -> adapter identity (core/lora_slots.py).
    lora_loads: dict[int, str] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


# (token_id, logprob, rank) of the chosen token, then the top-N as (token_id, logprob) best first.
TokenLogprobs = tuple[int, float, int, list[tuple[int, float]]]


@dataclass
class ModelRunnerOutput:
    """Per scheduled request (in chunk order): the sampled tokens (empty when it did not sample)."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # For chunks with want_prompt_logprobs: one entry per position whose *next* token is in the chunk
    # or later prompt, i.e. logprobs of prompt tokens start_pos+1 .. start_pos+len (capped by prompt).
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # Draft tokens proposed for each request's next step (the scheduler trims them to what may follow).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Requests whose own work failed this step (req id -> (request field at fault or None, message)): they
    # sampled nothing and the engine aborts them; every other request's results stand.
    failed: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    # Seconds spent in this step's phases inside the worker (inputs, forward, sample, propose, total).
    timings: dict[str, float] = field(default_factory=dict)
