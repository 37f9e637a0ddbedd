"""What the worker needs from speculative decoding, declared here so the worker never imports it.

`spec_decode.Speculator` implements `Drafter`; the engine builds one and hands it to the worker. Each
step the worker gives it the requests that go on decoding (`DraftRequest`) and returns its drafts to the
scheduler; when the next step verifies them, the worker reports acceptance back. A drafter that drafts from
the target's features (a draft head) sets `needs_hidden_states`, and every step then hands it the step's
last-layer hidden states (`StepHiddenStates`: the forward's own tensors, never copied) before it proposes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.sample.state import SamplingState


@dataclass
class DraftRequest:
    req_id: str
    token_ids: list[int]  # prompt + output; the last token has no KV yet
    state: SamplingState
    block_table: list[int]
    max_drafts: int  # the most draft tokens this request may take next step (>= 1)


@dataclass
class StepHiddenStates:
    """One step's tokens as the target computed them: ids (placeholders filled in), positions, the step's
    attention layout (slot mapping, block tables) and the final-norm hidden states of every token."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attention: AttentionMetadata
    hidden: torch.Tensor  # [num_tokens, hidden_size]


class Drafter(Protocol):
    num_speculative_tokens: int
    needs_hidden_states: bool  # hand it each step's StepHiddenStates (observe_hidden_states)

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots past a decoding request's tokens that drafting writes into (a draft model's own KV)."""

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes a KV block costs the drafter (its own KV in the target's block ids), 0 when it has none."""

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate the drafter's KV for the pool the worker sized."""

    def profile(self, time_target: Callable[[int], float], max_num_seqs: int, max_num_batched_tokens: int) -> None:
        """Measure what drafting and verifying cost, before any request exists."""

    def propose(self, requests: list[DraftRequest], num_other_tokens: int, prefill_next: bool) -> dict[str, list[int]]:
        """Drafts for the next step per request id; requests given none are absent."""

    def observe_hidden_states(self, step: StepHiddenStates) -> None:
        """The step's tokens and their target hidden states, every step, before `propose`."""

    def take_draft_probs(self, req_id: str, num_drafts: int) -> torch.Tensor | None:
        """The distributions the request's pending drafts were sampled from (None: deterministic drafts)."""

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        """How many of the request's drafts the target accepted."""

    def observe_step(self, num_tokens: int, drafted: bool, seconds: float) -> None:
        """The worker's own time for a step of num_tokens tokens."""

    def observe_decode_step(self, num_decodes: int, tokens: int, seconds: float) -> None:
        """A whole engine step of num_decodes decoding requests and nothing else, and the tokens it made."""

    def resumed(self, req_id: str) -> None:
        """The request was preempted and is recomputed in new blocks."""

    def finished(self, req_id: str) -> None:
        """The request is gone."""
