"""Drafting with an EAGLE-style head (eagle_head.py) from the target's own hidden states.

Every step the worker hands over the target's hidden states of the step's tokens. The proposer stores them
by KV slot (a hidden-state row beside the head's KV, in the target's block ids) and writes the head's KV of
those tokens at once, each token paired with the stored hidden state of the position before it. So the
head's KV always holds target features for every token the target has computed, whatever the step was
(prefill chunk, decode, verification): nothing is kept per request, and preemption, chunked prefill and
prefix hits need no bookkeeping (a cached block's rows were written when it was computed). Rows of rejected
drafts hold garbage until the real tokens there are computed and overwrite them, as the target's KV does.

Drafting starts at the request's last token (position n, not yet computed by the target) with the stored
hidden state of position n - 1, then goes on autoregressively from the head's own predicted features.
"""

from __future__ import annotations

import torch

from tokenmill.attention.metadata import AttentionMetadata, build_attention_metadata, forward_context
from tokenmill.spec_decode.draft_model import DraftingJob, drafting_jobs, pick_next_drafts
from tokenmill.spec_decode.eagle_head import EagleHead
from tokenmill.spec_decode.proposer import Draft, DraftRequest, Proposer, StepHiddenStates
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches, bytes_per_block
from tokenmill.worker.step_timer import time_forward


class EagleProposer(Proposer):
    needs_hidden_states = True

    def __init__(self, head: EagleHead, kv_dtype: torch.dtype, device: torch.device, target_vocab_size: int,
                 default_generator: torch.Generator, num_speculative_tokens: int,
                 confidence_threshold: float = 0.0) -> None:
        self.head = head
        self.kv_dtype = kv_dtype
        self.device = device
        self.vocab_size = target_vocab_size
        self.default_generator = default_generator  # for requests without a seed of their own
        self.confidence_threshold = confidence_threshold
        self.hidden_dtype = head.fc.weight.dtype
        self.block_size = 0  # set with the pool (init_cache)
        self.hidden_store = torch.empty(0, head.config.hidden_size, dtype=self.hidden_dtype, device=device)
        # Drafting k tokens writes head KV up to k-1 positions past the last known token.
        self.num_lookahead_tokens = num_speculative_tokens

    def kv_bytes_per_block(self, block_size: int) -> int:
        hidden_row = self.head.config.hidden_size * self.hidden_dtype.itemsize
        return bytes_per_block(self.head.attention_layers(), block_size, self.kv_dtype) + block_size * hidden_row

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        allocate_kv_caches(self.head.attention_layers(), num_blocks, block_size, self.kv_dtype, self.device)
        self.hidden_store = torch.zeros(num_blocks * block_size, self.head.config.hidden_size,
                                        dtype=self.hidden_dtype, device=self.device)

    def profile_draft_step(self, num_seqs: int) -> float:
        zeros = torch.zeros(num_seqs, self.head.config.hidden_size, dtype=self.hidden_dtype, device=self.device)
        return time_forward(self.head, num_seqs, 1, self.block_size, self.device,
                            forward=lambda ids, positions: self.head(ids, positions, zeros))

    @torch.inference_mode()
    def observe_hidden_states(self, step: StepHiddenStates) -> None:
        metadata = step.attention
        self.hidden_store[metadata.slot_mapping] = step.hidden.to(self.hidden_dtype)
        previous = self._previous_hidden(step.positions, metadata)
        with forward_context(metadata):
            self.head.write_kv(step.input_ids, step.positions, previous)

    def _previous_hidden(self, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Each token's target hidden state of the position before it, from the store (zeros at position 0)."""
        query_lens = torch.from_numpy(metadata.query_lens).to(positions.device)
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens), device=positions.device), query_lens)
        before = (positions - 1).clamp(min=0)
        blocks = metadata.block_tables[seq_of_token, before // metadata.block_size]
        rows = self.hidden_store[blocks * metadata.block_size + before % metadata.block_size]
        return rows.masked_fill((positions == 0).unsqueeze(-1), 0.0)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        jobs = drafting_jobs(requests, self.block_size)
        features: dict[int, torch.Tensor] = {}  # job index -> the head's feature of its last fed token
        active = [i for i, job in enumerate(jobs) if not job.done]
        if active:
            last = [len(jobs[i].request.token_ids) - 1 for i in active]
            ids = [jobs[i].request.token_ids[-1] for i in active]
            previous = self._stored_rows(jobs, active, [p - 1 for p in last])
            self._step(jobs, active, ids, last, previous, features)
        while active := [i for i in active if not jobs[i].done]:
            positions = [len(jobs[i].request.token_ids) - 1 + len(jobs[i].tokens) for i in active]
            previous = torch.stack([features[i] for i in active])
            self._step(jobs, active, [jobs[i].tokens[-1] for i in active], positions, previous, features)
        return [Draft(job.tokens, torch.stack(job.probs) if job.probs else None) for job in jobs]

    def _stored_rows(self, jobs: list[DraftingJob], active: list[int], positions: list[int]) -> torch.Tensor:
        slots = [jobs[i].request.block_table[p // self.block_size] * self.block_size + p % self.block_size
                 for i, p in zip(active, positions)]
        return self.hidden_store[torch.tensor(slots, dtype=torch.int64, device=self.device)]

    def _step(self, jobs: list[DraftingJob], active: list[int], ids: list[int], positions: list[int],
              previous: torch.Tensor, features: dict[int, torch.Tensor]) -> None:
        """One head forward (one token per active job) and each job's next draft from it."""
        metadata = build_attention_metadata(positions, [1] * len(active), [jobs[i].request.block_table for i in active],
                                            self.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        with forward_context(metadata):
            out = self.head(input_ids, torch.tensor(positions, dtype=torch.int64, device=self.device), previous)
        for row, i in enumerate(active):
            features[i] = out[row]
        pick_next_drafts([jobs[i] for i in active], self._target_logits(out), self.default_generator,
                         self.confidence_threshold)

    def _target_logits(self, features: torch.Tensor) -> torch.Tensor:
        """float32 logits over the target's vocabulary; tokens outside a reduced draft vocabulary impossible."""
        logits = self.head.compute_logits(features)
        rows = self.head.draft_to_target
        if rows is None:
            return logits[:, : self.vocab_size]
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, rows] = logits
        return full
