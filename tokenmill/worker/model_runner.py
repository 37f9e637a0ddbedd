"""Owns the model and its KV tensors; execute(SchedulerOutput) -> ModelRunnerOutput.

The runner keeps each request's sampling state (parameters, seeded generator, tokens so far) from the
first step it sees the request until the scheduler reports it finished; nothing else about requests
crosses from the core.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.core.sched_io import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from tokenmill.worker.forward_context import forward_context
from tokenmill.worker.input_batch import StepInputs, build_step_inputs
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches
from tokenmill.worker.sampler import Sampler, SamplingState, compute_logprobs, make_generator
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
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(model.attention_layers(), num_blocks, block_size, kv_dtype, device)
        self.sampler = Sampler(global_seed=seed, device=device)
        self.states: dict[str, SamplingState] = {}
        self.thinking: dict[str, ThinkingBudgetTracker] = {}

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for new in scheduler_output.new_requests:
            seed = new.sampling_params.seed
            self.states[new.req_id] = SamplingState(
                params=new.sampling_params,
                prompt_token_ids=new.prompt_token_ids,
                output_token_ids=[],
                generator=None if seed is None else make_generator(seed, self.device),
            )
            if new.sampling_params.thinking_token_budget is not None:
                self.thinking[new.req_id] = ThinkingBudgetTracker(new.sampling_params)
        for req_id in scheduler_output.finished_req_ids:
            self.states.pop(req_id, None)
            self.thinking.pop(req_id, None)
        chunks = scheduler_output.chunks
        if not chunks:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])

        inputs = build_step_inputs(scheduler_output, self.block_size, self.device)
        with forward_context(inputs.attention):
            hidden = self.model(inputs.input_ids, inputs.positions)
        sampled: list[list[int]] = [[] for _ in chunks]
        output = ModelRunnerOutput(req_ids=[c.req_id for c in chunks], sampled_token_ids=sampled)
        if inputs.sampling_chunks:
            self._sample(scheduler_output, inputs, hidden, output)
        self._prompt_logprobs(scheduler_output, inputs, hidden, output)
        return output

    def _sample(
        self, scheduler_output: SchedulerOutput, inputs: StepInputs, hidden: torch.Tensor, output: ModelRunnerOutput
    ) -> None:
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        states = [self.states[scheduler_output.chunks[i].req_id] for i in inputs.sampling_chunks]
        result = self.sampler(_ban_stop_tokens_before_min_tokens(logits, states), states, raw_logits=logits)
        for row, chunk_index in enumerate(inputs.sampling_chunks):
            req_id = scheduler_output.chunks[chunk_index].req_id
            token_id = result.token_ids[row]
            entry = result.logprobs[row]
            tracker = self.thinking.get(req_id)
            if tracker is not None:
                forced = tracker.forced_token()
                if forced is not None:
                    token_id = forced
                    if entry is not None:  # report the logprob of the token actually emitted
                        target = torch.tensor([forced], device=logits.device)
                        entry = compute_logprobs(logits[row : row + 1], target, states[row].params.logprobs or 0)[0]
                tracker.observe(token_id, forced=forced is not None)
            states[row].output_token_ids.append(token_id)
            output.sampled_token_ids[chunk_index].append(token_id)
            if entry is not None:
                output.logprobs.setdefault(req_id, []).append(entry)

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


def _ban_stop_tokens_before_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Until min_tokens are generated, EOS and stop ids cannot be sampled (as in vLLM).

    Works on a copy: logprobs are reported from the raw distribution.
    """
    banned_logits = logits
    for row, state in enumerate(states):
        params = state.params
        if len(state.output_token_ids) < params.min_tokens:
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(params.eos_token_ids))
            if banned:
                if banned_logits is logits:
                    banned_logits = logits.clone()
                banned_logits[row, banned] = float("-inf")
    return banned_logits
