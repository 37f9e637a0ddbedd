"""Decides how many drafts each decoding request gets, asks the proposer, and keeps what verify needs.

It is the worker's `Drafter` (worker/drafter.py), living next to the model runner: it sees every verification result (for per-request
acceptance), holds the draft distributions until the target verifies them, and applies the cost model
measured at start-up so that drafting shortens or stops as the batch grows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.spec_decode.cost_model import (
    AcceptanceTracker,
    StepCalibration,
    StepTimes,
    choose_batch_cap,
    per_request_lengths,
)
from tokenmill.spec_decode.measured_rates import LOOKUP, MODEL, PLAIN, MeasuredRates
from tokenmill.spec_decode.proposer import Draft, DraftRequest, Proposer, StepHiddenStates


class Speculator:
    def __init__(
        self,
        proposer: Proposer,
        num_speculative_tokens: int,
        adaptive: bool = True,
        min_gain: float = 0.1,
    ) -> None:
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens
        self.adaptive = adaptive
        self.min_gain = min_gain  # draft the j-th token only while acceptance**j reaches this
        self.target_times = StepTimes()
        self.draft_step_times: StepTimes | None = None
        self._acceptance: dict[str, AcceptanceTracker] = {}
        self._draft_probs: dict[str, torch.Tensor] = {}
        self.last_batch_cap = num_speculative_tokens
        self.calibration = StepCalibration()
        self.rates = MeasuredRates()
        # The proposing done in the previous step (whose drafts this step verifies) and in this one.
        self._proposals = (_Proposal(), _Proposal())
        self._proposal_seconds = 0.0  # predicted seconds of the drafting done at the end of this step

    @property
    def num_lookahead_tokens(self) -> int:
        return self.proposer.num_lookahead_tokens

    @property
    def needs_hidden_states(self) -> bool:
        return self.proposer.needs_hidden_states

    def observe_hidden_states(self, step: StepHiddenStates) -> None:
        self.proposer.observe_hidden_states(step)

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.proposer.kv_bytes_per_block(block_size)

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        self.proposer.init_cache(num_blocks, block_size)

    def profile(self, time_target: Callable[[int], float], max_num_seqs: int, max_num_batched_tokens: int) -> None:
        """Measure step times for the cost model: the target by tokens per step, drafting by batch size."""
        if not self.adaptive:
            return
        max_tokens = min(max_num_batched_tokens, max_num_seqs * (self.num_speculative_tokens + 1))
        self.target_times = StepTimes([(n, time_target(n)) for n in _powers_of_two_upto(max_tokens)])
        draft_points = []
        for num_seqs in _powers_of_two_upto(max_num_seqs):
            seconds = self.proposer.profile_draft_step(num_seqs)
            if seconds is None:
                break
            draft_points.append((num_seqs, seconds))
        self.draft_step_times = StepTimes(draft_points) if draft_points else None

    def observe_step(self, num_tokens: int, drafted: bool, seconds: float) -> None:
        """The real duration of one whole step (forward, sampling, verification, proposing) of num_tokens."""
        if self.adaptive and self.target_times.points:
            predicted = self.target_times(num_tokens) + self._proposal_seconds
            self.calibration.observe(predicted, seconds, drafted)
        self._proposal_seconds = 0.0

    def observe_decode_step(self, num_decodes: int, tokens: int, seconds: float) -> None:
        """A whole engine step (scheduling to outputs) of num_decodes decoding requests and nothing else.

        A step ends by drafting for the next one, so its drafts were made (and paid for) in the step before:
        the step is charged for that drafting instead of its own."""
        if self.adaptive:
            before, now = self._proposals
            self.rates.observe(num_decodes, before.arm, tokens, seconds - now.seconds + before.seconds)

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        self._acceptance.setdefault(req_id, AcceptanceTracker()).observe(num_drafts, num_accepted)

    def take_draft_probs(self, req_id: str, num_drafts: int) -> torch.Tensor | None:
        probs = self._draft_probs.pop(req_id, None)
        return None if probs is None else probs[:num_drafts]

    def resumed(self, req_id: str) -> None:
        self._draft_probs.pop(req_id, None)
        self.proposer.resumed(req_id)

    def finished(self, req_id: str) -> None:
        self._acceptance.pop(req_id, None)
        self._draft_probs.pop(req_id, None)
        self.proposer.finished(req_id)

    def propose(
        self, requests: list[DraftRequest], num_other_tokens: int, prefill_next: bool = False
    ) -> dict[str, list[int]]:
        """Drafts for the next step, per request id (requests given no drafts are absent).

        prefill_next: the next step will likely carry prefill too (so its speed says little about drafting)."""
        started = time.perf_counter()
        self._proposals = (self._proposals[1], _Proposal())
        try:
            return self._propose(requests, num_other_tokens, prefill_next)
        finally:
            self._proposals[1].seconds = time.perf_counter() - started

    def _propose(self, requests: list[DraftRequest], num_other_tokens: int, prefill_next: bool) -> dict[str, list[int]]:
        for request in requests:
            self._draft_probs.pop(request.req_id, None)
        if not requests:
            return {}
        if self.adaptive and self.rates.plain_settled(len(requests)):
            # Large batches, typically: skip the lookups and the cost model, which could only say no.
            self.rates.decide(len(requests), [PLAIN], PLAIN, explore=not prefill_next)
            for request in requests:
                self._acceptance.setdefault(request.req_id, AcceptanceTracker()).idle()
            return {}
        for request in requests:
            request.max_drafts = min(request.max_drafts, self.num_speculative_tokens)
        free = self.proposer.propose_free(requests)  # lookups: known before the cost model decides
        # A free draft can be no longer than what its lookup found; a model draft up to the request's cap.
        caps = [r.max_drafts if f is None else min(r.max_drafts, len(f.token_ids)) for r, f in zip(requests, free)]
        uses_model = [f is None for f in free]
        if self.adaptive:
            caps = self._adaptive_caps(requests, caps, uses_model, num_other_tokens, prefill_next)
        chosen = [(r, c) for r, c, model in zip(requests, caps, uses_model) if model and c > 0]
        for request, cap in chosen:
            request.max_drafts = cap
        drafts: dict[str, Draft] = {}
        if chosen:
            drafts = dict(zip((r.req_id for r, _ in chosen), self.proposer.propose([r for r, _ in chosen])))
        for request, cap, draft in zip(requests, caps, free):
            if draft is not None and cap > 0:
                probs = None if draft.probs is None else draft.probs[:cap]
                drafts[request.req_id] = Draft(draft.token_ids[:cap], probs)
        proposals: dict[str, list[int]] = {}
        by_model = {r.req_id for r, _ in chosen}
        for request in requests:
            draft = drafts.get(request.req_id)
            if draft is None or not draft.token_ids:
                if self.adaptive:
                    self._acceptance[request.req_id].idle()
                continue
            proposals[request.req_id] = draft.token_ids
            if draft.probs is not None:
                self._draft_probs[request.req_id] = draft.probs
        self._proposals[1].arm = MODEL if by_model & proposals.keys() else LOOKUP if proposals else PLAIN
        return proposals

    def _adaptive_caps(
        self, requests: list[DraftRequest], caps: list[int], uses_model: list[bool], num_other_tokens: int,
        prefill_next: bool,
    ) -> list[int]:
        """Draft lengths from acceptance, the cost model and, last, what such steps measured."""
        rates = [self._acceptance.setdefault(r.req_id, AcceptanceTracker()).rate for r in requests]
        caps = per_request_lengths(rates, caps, self.min_gain)
        batch_cap = choose_batch_cap(rates, caps, num_other_tokens, self.target_times, self.draft_step_times,
                                     self.calibration.spec_cost_factor, uses_model)
        # What steps of this many decodes really delivered, drafted each way, has the last word. Only steps of
        # decodes alone are measured; a step with a prefill chunk follows what they measured.
        available = [PLAIN]
        if any(c > 0 and not model for c, model in zip(caps, uses_model)):
            available.append(LOOKUP)
        if any(c > 0 and model for c, model in zip(caps, uses_model)):
            available.append(MODEL)
        preferred = PLAIN
        if batch_cap > 0:
            preferred = MODEL if any(min(c, batch_cap) > 0 and m for c, m in zip(caps, uses_model)) else LOOKUP
        explore = not prefill_next  # only steps of decodes alone are measured
        if not explore and preferred == MODEL:
            # Do not start the draft model (and its catch-up on every request's text) in a step that cannot
            # tell whether it paid; lookups, being free, may still draft.
            preferred = LOOKUP if LOOKUP in available else PLAIN
        arm = self.rates.decide(len(requests), available, preferred, explore)
        cap = 0 if arm == PLAIN else batch_cap or max(caps)
        caps = [0 if (arm == LOOKUP and model) else min(c, cap) for c, model in zip(caps, uses_model)]
        self.last_batch_cap = max(caps, default=0)
        model_caps = [c for c, model in zip(caps, uses_model) if model and c > 0]
        if self.draft_step_times is not None and model_caps:
            self._proposal_seconds = max(model_caps) * self.draft_step_times(len(model_caps))
        return caps


@dataclass
class _Proposal:
    seconds: float = 0.0
    arm: str = PLAIN  # how its drafts were made (measured_rates)


def _powers_of_two_upto(limit: int) -> list[int]:
    values, n = [], 1
    while n < limit:
        values.append(n)
        n *= 2
    values.append(max(limit, 1))
    return values
