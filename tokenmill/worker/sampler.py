"""Batched sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

All rows are processed with tensor ops over per-row parameters. The random draw is the exponential race
(argmax of p / q with q ~ Exp(1)), which equals sampling from p; a seeded request draws its q from its
own generator over exactly one vocabulary row per step, so its tokens do not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.core.sched_io import TokenLogprobs
from tokenmill.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """One request's sampling state, owned by the model runner for the request's lifetime."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    grammar: Any = None  # a structured-output GrammarMatcher, advanced with every emitted token


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] counts of each token in each row's list."""
    counts = torch.zeros(len(token_lists), vocab_size, device=device)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids = torch.tensor(tokens, dtype=torch.int64, device=device)
            counts[row].index_add_(0, ids, torch.ones(len(tokens), device=device))
    return counts


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Repetition (prompt + output, HF style), then frequency / presence (output only, OpenAI style)."""
    device, vocab = logits.device, logits.shape[-1]
    repetition = torch.tensor([s.params.repetition_penalty for s in states], device=device)[:, None]
    frequency = torch.tensor([s.params.frequency_penalty for s in states], device=device)[:, None]
    presence = torch.tensor([s.params.presence_penalty for s in states], device=device)[:, None]
    output_counts = _token_counts([s.output_token_ids for s in states], vocab, device)
    if bool((repetition != 1.0).any()):
        prompt_counts = _token_counts([s.prompt_token_ids for s in states], vocab, device)
        seen = (prompt_counts + output_counts) > 0
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def apply_filters(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; filtered tokens get -inf. Rows must have temperature > 0."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([s.params.temperature for s in states], device=device)[:, None]
    logits = logits / temperature
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in states], device=device)
    top_p = torch.tensor([s.params.top_p for s in states], device=device)
    min_p = torch.tensor([s.params.min_p for s in states], device=device)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        remove = ranks >= top_k.clamp(max=vocab)[:, None]
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
        mass_before = probs.cumsum(dim=-1) - probs
        remove = mass_before >= top_p[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """(token, logprob, 1-based rank, top-N) per row, from the raw model distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, token_ids.view(-1, 1)).squeeze(-1)
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top > 0 else (None, None)
    results: list[TokenLogprobs] = []
    for row in range(logits.shape[0]):
        top = [] if top_ids is None else list(zip(top_ids[row].tolist(), top_values[row].tolist()))
        results.append((int(token_ids[row]), float(chosen[row]), int(ranks[row]), top))
    return results


class Sampler:
    def __init__(self, global_seed: int = 0, device: torch.device = torch.device("cpu")) -> None:
        self.device = device
        self.generator = make_generator(global_seed, device)

    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState], raw_logits: torch.Tensor | None = None
    ) -> SamplerOutput:
        """Sample one token per row; logprobs come from `raw_logits` (the model's output) when given."""
        raw = logits if raw_logits is None else raw_logits
        if any(has_penalties(s.params) for s in states):
            logits = apply_penalties(logits, states)
        greedy = [s.params.temperature == 0.0 for s in states]
        token_ids = logits.argmax(dim=-1)
        random_rows = [row for row, is_greedy in enumerate(greedy) if not is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            filtered = apply_filters(logits[rows], [states[r] for r in random_rows])
            probs = filtered.softmax(dim=-1)
            noise = self._exponential_noise([states[r] for r in random_rows], probs.shape[-1])
            token_ids[rows] = (probs / noise).argmax(dim=-1)
        logprobs: list[TokenLogprobs | None] = [None] * len(states)
        wanted = [row for row, s in enumerate(states) if s.params.logprobs is not None]
        if wanted:
            num_top = max(states[row].params.logprobs or 0 for row in wanted)
            rows = torch.tensor(wanted, device=logits.device)
            entries = compute_logprobs(raw[rows], token_ids[rows], num_top)
            for row, (token, logprob, rank, top) in zip(wanted, entries):
                logprobs[row] = (token, logprob, rank, top[: states[row].params.logprobs])
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def _exponential_noise(self, states: list[SamplingState], vocab_size: int) -> torch.Tensor:
        """Exp(1) noise per row: seeded rows from their own generator, the rest from the global one."""
        noise = torch.empty(len(states), vocab_size, device=self.device)
        unseeded = [row for row, s in enumerate(states) if s.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), vocab_size, device=self.device).exponential_(
                generator=self.generator
            )
        for row, state in enumerate(states):
            if state.generator is not None:
                noise[row].exponential_(generator=state.generator)
        return noise.clamp_min_(1e-20)


def min_tokens_banned_ids(params: SamplingParams, num_generated: int) -> list[int]:
    """Until min_tokens are generated, EOS and stop ids cannot be sampled (as in vLLM)."""
    if num_generated >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(params.eos_token_ids))


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
