"""What every draft proposer looks like to the model runner.

A proposer gets the requests that decode next step, each with the most drafts it may take, and returns
draft token ids (and, when it sampled them from a distribution, that distribution for lossless
verification). N-gram lookup, a separate draft model and draft heads all fit this shape; a draft head also
reads the target's hidden states, which it asks for with `needs_hidden_states`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tokenmill.worker.drafter import DraftRequest, StepHiddenStates

__all__ = ["Draft", "DraftRequest", "Proposer", "StepHiddenStates"]


@dataclass
class Draft:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), vocab]: q each draft was sampled from; None = deterministic


class Proposer(ABC):
    # KV slots past a decoding request's tokens that proposing writes into (a draft model's own KV).
    num_lookahead_tokens: int = 0
    # Whether the worker hands it every step's target hidden states (observe_hidden_states).
    needs_hidden_states: bool = False

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft per request, at most request.max_drafts tokens (possibly none)."""

    def propose_free(self, requests: list[DraftRequest]) -> list[Draft | None]:
        """Drafts that cost no model step (lookups), per request; None where only `propose` can draft.

        The speculator asks this first, so that its cost model charges draft-model steps only to the
        requests that need them."""
        return [None] * len(requests)

    def observe_hidden_states(self, step: StepHiddenStates) -> None:
        """The step's tokens and the target's hidden states of them (only when needs_hidden_states)."""

    def resumed(self, req_id: str) -> None:
        """The request was preempted and is recomputed in new blocks: forget what was kept for it."""

    def finished(self, req_id: str) -> None:
        """The request is gone."""

    def profile_draft_step(self, num_seqs: int) -> float | None:
        """Seconds for one drafting step over num_seqs requests, or None when drafting is free."""
        return None

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of the proposer's own KV per block of the target's pool (0 without a model)."""
        return 0

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate the proposer's own KV for the target's pool size (nothing without a model)."""
