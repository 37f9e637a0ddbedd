"""Owns the model and its KV tensors; execute(SchedulerOutput) -> ModelRunnerOutput.

The runner keeps each request's sampling state (parameters, seeded generator, tokens so far) from the
first step it sees the request until the scheduler reports it finished; nothing else about requests
crosses from the core.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn

from tokenmill.core.sched_io import ModelRunnerOutput, ScheduledChunk, SchedulerOutput, TokenLogprobs
from tokenmill.spec_decode.proposer import DraftRequest
from tokenmill.spec_decode.rejection_sampler import VerifyRequest, verify_batch
from tokenmill.spec_decode.speculator import Speculator
from tokenmill.worker.forward_context import forward_context
from tokenmill.worker.grammar_masks import GrammarMasks
from tokenmill.worker.input_batch import StepInputs, build_step_inputs
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches
from tokenmill.worker.sampler import (
    Sampler,
    SamplingState,
    compute_logprobs,
    make_generator,
    min_tokens_banned_ids,
)
from tokenmill.worker.step_timer import time_forward
from tokenmill.worker.thinking_budget import ThinkingBudgetTracker


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
        max_model_len: int | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(model.attention_layers(), num_blocks, block_size, kv_dtype, device)
        self.sampler = Sampler(global_seed=seed, device=device)
        self.states: dict[str, SamplingState] = {}
        self.thinking: dict[str, ThinkingBudgetTracker] = {}
        self.max_model_len = max_model_len
        self.speculator: Speculator | None = None
        # Set by the engine (enable_structured_output) when the first structured request arrives.
        self.grammar_compiler: Any = None
        self.grammar_masks: GrammarMasks | None = None

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for new in scheduler_output.new_requests:
            seed = new.sampling_params.seed
            self.states[new.req_id] = SamplingState(
                params=new.sampling_params,
                prompt_token_ids=new.prompt_token_ids,
                output_token_ids=[],
                generator=None if seed is None else make_generator(seed, self.device),
                grammar=None
                if new.sampling_params.structured_outputs is None
                else self.grammar_compiler.matcher(new.sampling_params.structured_outputs),
            )
            if new.sampling_params.thinking_token_budget is not None:
                self.thinking[new.req_id] = ThinkingBudgetTracker(new.sampling_params)
        for req_id in scheduler_output.finished_req_ids:
            self.states.pop(req_id, None)
            self.thinking.pop(req_id, None)
            if self.speculator is not None:
                self.speculator.finished(req_id)
        if self.speculator is not None:
            for req_id in scheduler_output.resumed_req_ids:
                self.speculator.resumed(req_id)
        chunks = scheduler_output.chunks
        if not chunks:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])

        started = time.perf_counter()
        inputs = build_step_inputs(scheduler_output, self.block_size, self.device)
        plain = [(c, r) for c, r in zip(inputs.sampling_chunks, inputs.logits_row_starts) if not chunks[c].num_spec_tokens]
        grammar_rows = [i for i, (c, _) in enumerate(plain) if self.states[chunks[c].req_id].grammar is not None]
        masks = None
        if grammar_rows and self.grammar_masks is not None:
            masks = self.grammar_masks.start([self.states[chunks[plain[i][0]].req_id].grammar for i in grammar_rows])
        with forward_context(inputs.attention):
            hidden = self.model(inputs.input_ids, inputs.positions)
        sampled: list[list[int]] = [[] for _ in chunks]
        output = ModelRunnerOutput(req_ids=[c.req_id for c in chunks], sampled_token_ids=sampled)
        if inputs.sampling_chunks:
            self._sample(scheduler_output, inputs, hidden, output, plain, (masks, grammar_rows))
        self._prompt_logprobs(scheduler_output, inputs, hidden, output)
        if self.speculator is not None and inputs.sampling_chunks:
            self._propose_drafts(scheduler_output, inputs, output)
            drafted = any(c.num_spec_tokens for c in chunks)
            # Sampled token ids are already on the host (the step has synchronized), so this is the step's time.
            self.speculator.observe_step(len(inputs.input_ids), drafted, time.perf_counter() - started)
        return output

    def enable_structured_output(self, compiler: Any, vocab_size: int) -> None:
        self.grammar_compiler = compiler
        self.grammar_masks = GrammarMasks(vocab_size, overlap=self.device.type != "cpu")

    def time_target_step(self, num_tokens: int) -> float:
        """Seconds of one target forward over num_tokens tokens laid out as decodes (for the cost model)."""
        num_seqs = min(num_tokens, 256)
        return time_forward(self.model, num_seqs, -(-num_tokens // num_seqs), self.block_size, self.device)

    def _propose_drafts(self, scheduler_output: SchedulerOutput, inputs: StepInputs, output: ModelRunnerOutput) -> None:
        """Drafts for every request that goes on decoding, returned to the scheduler for the next step."""
        assert self.speculator is not None
        candidates = []
        sampling = set(inputs.sampling_chunks)
        num_other_tokens = 0
        for index, chunk in enumerate(scheduler_output.chunks):
            if index not in sampling:
                num_other_tokens += len(chunk.token_ids)
                continue
            state = self.states[chunk.req_id]
            room = self._draft_room(state)
            # Forced thinking-budget tokens and grammar-masked tokens are not verified like free ones:
            # those requests decode without drafts.
            if room > 0 and chunk.req_id not in self.thinking and state.grammar is None:
                token_ids = state.prompt_token_ids + state.output_token_ids
                candidates.append(DraftRequest(chunk.req_id, token_ids, state, chunk.block_table, room))
        # The next step is measurable (decodes alone) only if no prefill continues or waits to start.
        prefill_next = num_other_tokens > 0 or scheduler_output.num_waiting > 0
        output.spec_token_ids = self.speculator.propose(candidates, num_other_tokens, prefill_next)

    def _draft_room(self, state: SamplingState) -> int:
        """How many drafts could still be useful: the target adds one token after them, within limits."""
        params, generated = state.params, state.output_token_ids
        if not generated:
            return 0
        last = generated[-1]
        if len(generated) >= params.min_tokens and (
            last in params.stop_token_ids or (not params.ignore_eos and last in params.eos_token_ids)
        ):
            return 0  # the request is finishing
        room = self.speculator.num_speculative_tokens if self.speculator else 0
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - len(generated) - 1)
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - len(state.prompt_token_ids) - len(generated) - 1)
        return room

    def _sample(
        self,
        scheduler_output: SchedulerOutput,
        inputs: StepInputs,
        hidden: torch.Tensor,
        output: ModelRunnerOutput,
        plain: list[tuple[int, int]],
        grammar: tuple[Future[torch.Tensor] | None, list[int]],
    ) -> None:
        """Sample plain rows (the grammar mask applied) and verify the drafts of speculating rows."""
        chunks = scheduler_output.chunks
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if plain:
            rows = logits if len(plain) == logits.shape[0] else logits[[r for _, r in plain]]
            states = [self.states[chunks[c].req_id] for c, _ in plain]
            shaped = _ban_stop_tokens_before_min_tokens(rows, states)
            pending, grammar_rows = grammar
            if pending is not None and self.grammar_masks is not None:
                shaped = _mask_grammar(self.grammar_masks, pending, shaped, rows, grammar_rows)
            result = self.sampler(shaped, states, raw_logits=rows)
            for i, (chunk_index, _) in enumerate(plain):
                self._emit(chunks[chunk_index].req_id, chunk_index, rows[i], result.token_ids[i], result.logprobs[i], output)
        verifying = [(c, r) for c, r in zip(inputs.sampling_chunks, inputs.logits_row_starts) if chunks[c].num_spec_tokens]
        if verifying:
            self._verify([chunks[c] for c, _ in verifying], [c for c, _ in verifying], [r for _, r in verifying],
                         logits, output)

    def _emit(
        self,
        req_id: str,
        chunk_index: int,
        logits_row: torch.Tensor,
        token_id: int,
        entry: TokenLogprobs | None,
        output: ModelRunnerOutput,
    ) -> None:
        """Record one sampled token, unless the thinking budget forces another one."""
        state = self.states[req_id]
        tracker = self.thinking.get(req_id)
        if tracker is not None:
            forced = tracker.forced_token()
            if forced is not None:
                token_id = forced
                if entry is not None:  # report the logprob of the token actually emitted
                    target = torch.tensor([forced], device=logits_row.device)
                    entry = compute_logprobs(logits_row[None], target, state.params.logprobs or 0)[0]
            tracker.observe(token_id, forced=forced is not None)
        if state.grammar is not None:
            state.grammar.accept_token(token_id)
        state.output_token_ids.append(token_id)
        output.sampled_token_ids[chunk_index].append(token_id)
        if entry is not None:
            output.logprobs.setdefault(req_id, []).append(entry)

    def _verify(
        self,
        chunks: list[ScheduledChunk],
        chunk_indices: list[int],
        row_starts: list[int],
        logits: torch.Tensor,
        output: ModelRunnerOutput,
    ) -> None:
        """Check the chunks' draft tokens against the target: each emits accepted drafts plus one token."""
        assert self.speculator is not None
        requests, rows = [], []
        for chunk, row in zip(chunks, row_starts):
            state = self.states[chunk.req_id]
            drafts = chunk.token_ids[len(chunk.token_ids) - chunk.num_spec_tokens :]
            generator = state.generator if state.generator is not None else self.sampler.generator
            probs = self.speculator.take_draft_probs(chunk.req_id, len(drafts))
            requests.append(VerifyRequest(state, drafts, generator, probs))
            rows.extend(range(row, row + 1 + len(drafts)))
        verify_logits = logits[rows]
        results = verify_batch(verify_logits, requests)
        offset = 0
        for chunk, chunk_index, request, emitted in zip(chunks, chunk_indices, requests, results):
            self.speculator.observe(chunk.req_id, len(request.draft_token_ids), len(emitted) - 1)
            request.state.output_token_ids.extend(emitted)
            output.sampled_token_ids[chunk_index].extend(emitted)
            if request.state.params.logprobs is not None:
                own = verify_logits[offset : offset + len(emitted)]
                targets = torch.tensor(emitted, device=logits.device)
                entries = compute_logprobs(own, targets, request.state.params.logprobs)
                output.logprobs.setdefault(chunk.req_id, []).extend(entries)
            offset += len(request.draft_token_ids) + 1

    def _prompt_logprobs(
        self, scheduler_output: SchedulerOutput, inputs: StepInputs, hidden: torch.Tensor, output: ModelRunnerOutput
    ) -> None:
        """Logprobs of prompt tokens start_pos+1 .. for chunks that asked; position p predicts token p+1."""
        offset = 0
        for chunk in scheduler_output.chunks:
            length = len(chunk.token_ids)
            if chunk.want_prompt_logprobs:
                state = self.states[chunk.req_id]
                prompt = state.prompt_token_ids
                end = min(chunk.start_pos + length, len(prompt) - 1)
                count = end - chunk.start_pos
                if count > 0:
                    logits = self.model.compute_logits(hidden[offset : offset + count])
                    targets = torch.tensor(prompt[chunk.start_pos + 1 : end + 1], device=logits.device)
                    entries: list[TokenLogprobs] = compute_logprobs(logits, targets, state.params.prompt_logprobs or 0)
                    output.prompt_logprobs.setdefault(chunk.req_id, []).extend(entries)
            offset += length


def _mask_grammar(
    masks: GrammarMasks, pending: Future[torch.Tensor], shaped: torch.Tensor, raw: torch.Tensor, rows: list[int]
) -> torch.Tensor:
    """Apply structured-output masks; a row the min-tokens ban left empty takes the grammar alone."""
    masked = masks.apply(pending, shaped, rows)
    all_masked = torch.isinf(masked[rows]).all(dim=-1).tolist()
    empty = [r for r, gone in zip(rows, all_masked) if gone]
    if empty:  # the grammar allows only EOS while min_tokens forbids it: the grammar wins
        masked[empty] = masks.apply(pending, raw, rows)[empty]
    return masked


def _ban_stop_tokens_before_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Apply the min-tokens ban on a copy: logprobs are reported from the raw distribution."""
    banned_logits = logits
    for row, state in enumerate(states):
        banned = min_tokens_banned_ids(state.params, len(state.output_token_ids))
        if banned:
            if banned_logits is logits:
                banned_logits = logits.clone()
            banned_logits[row, banned] = float("-inf")
    return banned_logits
