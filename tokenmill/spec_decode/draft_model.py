"""A separate small draft model that shares the target's tokenizer and proposes tokens autoregressively.

Its KV lives in its own paged tensors indexed by the *target's* block tables, so it needs no allocator of
its own: a request's draft KV sits in the same block ids as its target KV. The draft remembers which tokens
it has fed per request; after verification it keeps the KV of the tokens that were accepted and feeds the
rest (a catch-up chunk) before drafting again. Drafts are sampled from the request's own distribution
(penalties, temperature, top-k/p, min-p) so that verification can be lossless; a draft whose top
probability falls below `confidence_threshold` ends the request's drafting for this step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmill.attention.metadata import build_attention_metadata, forward_context
from tokenmill.sample.sampler import probs_rows
from tokenmill.sample.shaping import shape_logits
from tokenmill.spec_decode.proposer import Draft, DraftRequest, Proposer
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches, bytes_per_block
from tokenmill.worker.step_timer import time_forward


@dataclass
class _FedTokens:
    """Tokens whose draft KV is written at positions 0..: a verified prefix, then drafts fed after it."""

    num_verified: int = 0
    drafts: list[int] = field(default_factory=list)

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many leading positions of token_ids already have correct draft KV."""
        count = min(self.num_verified, len(token_ids))
        for fed in self.drafts:
            if count >= len(token_ids) or token_ids[count] != fed:
                break
            count += 1
        return count


@dataclass
class DraftingJob:
    request: DraftRequest
    budget: int
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    done: bool = False


class DraftModelProposer(Proposer):
    def __init__(
        self,
        model: nn.Module,
        kv_dtype: torch.dtype,
        device: torch.device,
        target_vocab_size: int,
        default_generator: torch.Generator,
        num_speculative_tokens: int,
        confidence_threshold: float = 0.0,
    ) -> None:
        self.model = model
        self.kv_dtype = kv_dtype
        self.block_size = 0  # set with the pool (init_cache)
        self.device = device
        self.vocab_size = target_vocab_size
        self.default_generator = default_generator  # for requests without a seed of their own
        self.confidence_threshold = confidence_threshold
        self.kv_caches: list[torch.Tensor] = []
        # Drafting k tokens writes KV up to k-1 positions past the last known token.
        self.num_lookahead_tokens = num_speculative_tokens
        self._fed: dict[str, _FedTokens] = {}

    def kv_bytes_per_block(self, block_size: int) -> int:
        return bytes_per_block(self.model.attention_layers(), block_size, self.kv_dtype)

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv_caches = allocate_kv_caches(self.model.attention_layers(), num_blocks, block_size, self.kv_dtype,
                                            self.device)

    def resumed(self, req_id: str) -> None:
        self._fed.pop(req_id, None)

    def finished(self, req_id: str) -> None:
        self._fed.pop(req_id, None)

    def profile_draft_step(self, num_seqs: int) -> float:
        return time_forward(self.model, num_seqs, 1, self.block_size, self.device)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        jobs = drafting_jobs(requests, self.block_size)
        active = [job for job in jobs if not job.done]
        if active:
            self._catch_up_and_draft_first(active)
        while True:
            active = [job for job in jobs if not job.done]
            if not active:
                break
            self._draft_next(active)
        return [Draft(job.tokens, torch.stack(job.probs) if job.probs else None) for job in jobs]

    def _catch_up_and_draft_first(self, jobs: list[DraftingJob]) -> None:
        """Feed each request's tokens that lack draft KV (at least its last one) and draft token 1."""
        starts, chunks = [], []
        for job in jobs:
            token_ids = job.request.token_ids
            fed = self._fed.setdefault(job.request.req_id, _FedTokens())
            start = min(fed.valid_prefix(token_ids), len(token_ids) - 1)
            starts.append(start)
            chunks.append(token_ids[start:])
            self._fed[job.request.req_id] = _FedTokens(num_verified=len(token_ids))
        self._forward_and_pick(jobs, starts, chunks)

    def _draft_next(self, jobs: list[DraftingJob]) -> None:
        starts = [len(job.request.token_ids) + len(job.tokens) - 1 for job in jobs]
        chunks = [[job.tokens[-1]] for job in jobs]
        for job in jobs:
            self._fed[job.request.req_id].drafts.append(job.tokens[-1])
        self._forward_and_pick(jobs, starts, chunks)

    def _forward_and_pick(self, jobs: list[DraftingJob], starts: list[int], chunks: list[list[int]]) -> None:
        lengths = [len(c) for c in chunks]
        metadata = build_attention_metadata(
            starts, lengths, [job.request.block_table for job in jobs], self.block_size, self.device
        )
        input_ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64, device=self.device)
        positions = torch.tensor(
            [p for s, n in zip(starts, lengths) for p in range(s, s + n)], dtype=torch.int64, device=self.device
        )
        with forward_context(metadata):
            hidden = self.model(input_ids, positions)
        last = torch.from_numpy(metadata.query_start_loc[1:] - 1).to(self.device)
        logits = fit_vocab(self.model.compute_logits(hidden[last]).float(), self.vocab_size)
        self._pick(jobs, logits)

    def _pick(self, jobs: list[DraftingJob], logits: torch.Tensor) -> None:
        pick_next_drafts(jobs, logits, self.default_generator, self.confidence_threshold)


def drafting_jobs(requests: list[DraftRequest], block_size: int) -> list[DraftingJob]:
    """One job per request, its draft budget capped so every draft's KV write stays inside its block table."""
    jobs = []
    for request in requests:
        capacity = len(request.block_table) * block_size
        # The j-th draft is fed at position len + j - 1.
        budget = min(request.max_drafts, capacity - len(request.token_ids) + 1)
        jobs.append(DraftingJob(request, budget, done=budget <= 0))
    return jobs


def pick_next_drafts(jobs: list[DraftingJob], logits: torch.Tensor, default_generator: torch.Generator,
                     confidence_threshold: float) -> None:
    """Each job's next draft, from its own shaped distribution; low confidence ends its drafting.

    logits: [len(jobs), target vocab], float32."""
    states = [job.request.state for job in jobs]
    shaped = shape_logits(logits, states, [s.output_token_ids + job.tokens for s, job in zip(states, jobs)])
    sampling = [i for i, s in enumerate(states) if s.params.temperature > 0.0]
    probs = shaped.softmax(dim=-1)  # greedy rows: confidence at temperature 1
    if sampling:
        probs[sampling] = probs_rows(shaped[sampling], [states[i] for i in sampling])
    tokens = shaped.argmax(dim=-1).tolist()
    for i in sampling:
        generator = states[i].generator if states[i].generator is not None else default_generator
        tokens[i] = int(torch.multinomial(probs[i], 1, generator=generator))
    confidence = probs.max(dim=-1).values.tolist()
    for i, job in enumerate(jobs):
        if confidence[i] < confidence_threshold:
            job.done = True
            continue
        job.tokens.append(tokens[i])
        if states[i].params.temperature > 0.0:
            job.probs.append(probs[i])
        job.done = len(job.tokens) >= job.budget


def fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft logits over the target's vocabulary: extra columns dropped, missing ones impossible."""
    width = logits.shape[-1]
    if width == vocab_size:
        return logits
    if width > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - width), float("-inf"))
    return torch.cat([logits, pad], dim=-1)
