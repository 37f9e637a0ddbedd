"""Batched sampling of shaped logits: temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Rows arrive already shaped (shaping.shape_logits). The random draw is the exponential race (argmax of
p / q with q ~ Exp(1)), which equals sampling from p; a seeded request draws its q from its own generator
over exactly one vocabulary row per step, so its tokens do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.core.sched_io import TokenLogprobs
from tokenmill.sample.state import SamplingState, make_generator


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def apply_filters(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; filtered tokens get -inf. Rows must have temperature > 0."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([s.params.temperature for s in states], device=device)[:, None]
    logits = logits / temperature
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in states], device=device)
    top_p = torch.tensor([s.params.top_p for s in states], device=device)
    min_p = torch.tensor([s.params.min_p for s in states], device=device)
    # Which filters run is decided from the host-side params, not from the device tensors: no sync.
    if any(0 < s.params.top_k < vocab or s.params.top_p < 1.0 for s in states):
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
    if any(s.params.min_p > 0 for s in states):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def probs_rows(shaped: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """[rows, vocab] sampling probabilities of shaped rows; every row must have temperature > 0."""
    return apply_filters(shaped, states).softmax(dim=-1)


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """(token, logprob, 1-based rank, top-N) per row, from the raw model distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, token_ids.view(-1, 1)).squeeze(-1)
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top > 0 else (None, None)
    results: list[TokenLogprobs] = []
    # One wait for the device, not one per row: every result comes to the host together.
    chosen_list, ranks_list, ids, top_id_rows, top_value_rows = to_host(chosen, ranks, token_ids, top_ids, top_values)
    for row in range(logits.shape[0]):
        top = [] if top_ids is None else list(zip(top_id_rows[row], top_value_rows[row]))
        results.append((int(ids[row]), float(chosen_list[row]), int(ranks_list[row]), top))
    return results


def to_host(*tensors: torch.Tensor | None) -> list[list]:
    """Each tensor as a (nested) list, read from the device after one synchronization instead of one each
    (non-blocking copies land in pinned memory); None stays an empty list."""
    present = [t for t in tensors if t is not None]
    if present and present[0].device.type == "cuda":
        copies = iter([t.to("cpu", non_blocking=True) for t in present])
        torch.cuda.current_stream(present[0].device).synchronize()
    else:
        copies = iter(present)
    return [next(copies).tolist() if t is not None else [] for t in tensors]


class Sampler:
    def __init__(self, global_seed: int = 0, device: torch.device = torch.device("cpu")) -> None:
        self.device = device
        self.generator = make_generator(global_seed, device)

    def __call__(
        self, shaped: torch.Tensor, states: Sequence[SamplingState], raw_logits: torch.Tensor | None = None
    ) -> SamplerOutput:
        """Sample one token per row of shaped logits; logprobs come from `raw_logits` (the model's) when given."""
        raw = shaped if raw_logits is None else raw_logits
        token_ids = shaped.argmax(dim=-1)
        random_rows = [row for row, s in enumerate(states) if s.params.temperature != 0.0]
        if random_rows:
            rows = torch.tensor(random_rows, device=shaped.device)
            probs = probs_rows(shaped[rows], [states[r] for r in random_rows])
            noise = self._exponential_noise([states[r] for r in random_rows], probs.shape[-1])
            token_ids[rows] = (probs / noise).argmax(dim=-1)
        logprobs: list[TokenLogprobs | None] = [None] * len(states)
        wanted = [row for row, s in enumerate(states) if s.params.logprobs is not None]
        if wanted:
            num_top = max(states[row].params.logprobs or 0 for row in wanted)
            rows = torch.tensor(wanted, device=shaped.device)
            entries = compute_logprobs(raw[rows], token_ids[rows], num_top)
            for row, (token, logprob, rank, top) in zip(wanted, entries):
                logprobs[row] = (token, logprob, rank, top[: states[row].params.logprobs])
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def _exponential_noise(self, states: Sequence[SamplingState], vocab_size: int) -> torch.Tensor:
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
