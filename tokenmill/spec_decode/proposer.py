"""What every draft proposer looks like to the model runner.

A proposer gets the requests that decode next step, each with the most drafts it may take, and returns
draft token ids (and, when it sampled them from a distribution, that distribution for lossless
verification). N-gram lookup, a separate draft model, draft heads and multi-token-prediction heads all
fit this shape; the last two would also read the target's hidden states, which `propose` can grow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tokenmill.worker.sampler import SamplingState


@dataclass
class DraftRequest:
    req_id: str
    token_ids: list[int]  # prompt + output; the last token has no KV yet
    state: SamplingState
    block_table: list[int]
    max_drafts: int  # the most draft tokens this request may take next step (>= 1)


@dataclass
class Draft:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), vocab]: q each draft was sampled from; None = deterministic


class Proposer(ABC):
    # KV slots past a decoding request's tokens that proposing writes into (a draft model's own KV).
    num_lookahead_tokens: int = 0

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft per request, at most request.max_drafts tokens (possibly none)."""

    def propose_free(self, requests: list[DraftRequest]) -> list[Draft | None]:
        """Drafts that cost no model step (lookups), per request; None where only `propose` can draft.

        The speculator asks this first, so that its cost model charges draft-model steps only to the
        requests that need them."""
        return [None] * len(requests)

    def resumed(self, req_id: str) -> None:
        """The request was preempted and is recomputed in new blocks: forget what was kept for it."""

    def finished(self, req_id: str) -> None:
        """The request is gone."""

    def profile_draft_step(self, num_seqs: int) -> float | None:
        """Seconds for one drafting step over num_seqs requests, or None when drafting is free."""
        return None
