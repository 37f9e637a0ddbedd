"""Lossless verification of draft tokens against the target's logits, batched over requests.

Greedy: accept while the draft equals the target's choice, then emit the target's token.
Sampling: accept draft x with probability min(1, p(x) / q(x)); on rejection emit a sample of the
normalized residual max(0, p - q). p is the target distribution shaped exactly as plain sampling shapes it
(shaping.shape_logits), so the output distribution equals sampling without speculation. A proposer
without probabilities is a deterministic draft (q is one-hot on the drafted token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sample.sampler import probs_rows
from tokenmill.sample.shaping import shape_logits
from tokenmill.sample.state import SamplingState


@dataclass
class VerifyRequest:
    state: SamplingState
    draft_token_ids: list[int]
    generator: torch.Generator
    draft_probs: torch.Tensor | None = None  # [k, vocab]: the q each draft was sampled from


def verify_batch(logits: torch.Tensor, requests: list[VerifyRequest]) -> list[list[int]]:
    """logits: for each request in order, k+1 rows (the last known token's position and each draft's).

    Returns per request the accepted drafts followed by one token from the target (a correction or the
    bonus token): between 1 and k+1 tokens.
    """
    states, generated = [], []
    for request in requests:
        output = request.state.output_token_ids
        for j in range(len(request.draft_token_ids) + 1):
            states.append(request.state)
            generated.append(output + request.draft_token_ids[:j])  # position j assumes drafts < j accepted
    shaped = shape_logits(logits, states, generated)
    sampling_rows = [i for i, s in enumerate(states) if s.params.temperature > 0.0]
    probs = None
    if sampling_rows:
        probs = torch.zeros_like(shaped)
        probs[sampling_rows] = probs_rows(shaped[sampling_rows], [states[i] for i in sampling_rows])
    greedy_choice = shaped.argmax(dim=-1).tolist()
    emitted_all, row = [], 0
    for request in requests:
        num_rows = len(request.draft_token_ids) + 1
        if request.state.params.temperature == 0.0:
            emitted = _accept_greedy(request.draft_token_ids, greedy_choice[row : row + num_rows])
        else:
            assert probs is not None
            emitted = _accept_sampled(request, probs[row : row + num_rows])
        emitted_all.append(emitted)
        row += num_rows
    return emitted_all


def _accept_greedy(drafts: list[int], target_choice: list[int]) -> list[int]:
    emitted = []
    for draft, target in zip(drafts, target_choice):
        emitted.append(target)
        if draft != target:
            return emitted
    emitted.append(target_choice[len(drafts)])
    return emitted


def _accept_sampled(request: VerifyRequest, probs: torch.Tensor) -> list[int]:
    drafts, q = request.draft_token_ids, request.draft_probs
    k = len(drafts)
    index = torch.arange(k, device=probs.device)
    draft_ids = torch.tensor(drafts, dtype=torch.int64, device=probs.device)
    p_draft = probs[index, draft_ids].tolist()
    q_draft = q[index, draft_ids].tolist() if q is not None else [1.0] * k
    uniforms = torch.rand(k, generator=request.generator, device=probs.device).tolist()
    for j in range(k):
        accept = min(1.0, p_draft[j] / q_draft[j]) if q_draft[j] > 0 else 0.0
        if uniforms[j] >= accept:
            return drafts[:j] + [_sample_residual(probs[j], drafts[j], None if q is None else q[j], request.generator)]
    bonus = torch.multinomial(probs[k], 1, generator=request.generator)
    return drafts + [int(bonus)]


def _sample_residual(p: torch.Tensor, draft: int, q: torch.Tensor | None, generator: torch.Generator) -> int:
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:  # p == q: a rejection has probability zero; fall back to p
        residual = p
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
