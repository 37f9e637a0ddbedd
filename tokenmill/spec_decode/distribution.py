"""Next-token distributions of draft and verify positions, shaped exactly as plain sampling shapes them.

Verification and draft sampling both go through here, so the target's p and the draft's q see the same
min-tokens ban, penalties, temperature, top-k, top-p and min-p: that is what makes acceptance lossless.
Rows are batched across requests and positions; each row names its request's state and the tokens
generated before that position (the output so far plus the drafts ahead of it).
"""

from __future__ import annotations

import torch

from tokenmill.worker.sampler import SamplingState, apply_filters, apply_penalties, has_penalties, min_tokens_banned_ids


def shape_rows(logits: torch.Tensor, states: list[SamplingState], generated: list[list[int]]) -> torch.Tensor:
    """[rows, vocab] logits after the min-tokens ban and penalties (before temperature and filters)."""
    shaped = logits
    for row, (state, tokens) in enumerate(zip(states, generated)):
        banned = min_tokens_banned_ids(state.params, len(tokens))
        if banned:
            if shaped is logits:
                shaped = logits.clone()
            shaped[row, banned] = float("-inf")
    if any(has_penalties(s.params) for s in states):
        row_states = [SamplingState(s.params, s.prompt_token_ids, tokens, None) for s, tokens in zip(states, generated)]
        shaped = apply_penalties(shaped, row_states)
    return shaped


def probs_rows(shaped: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """[rows, vocab] sampling probabilities of shaped rows; every row must have temperature > 0."""
    return apply_filters(shaped, states).softmax(dim=-1)


def fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft logits over the target's vocabulary: extra columns dropped, missing ones impossible."""
    width = logits.shape[-1]
    if width == vocab_size:
        return logits
    if width > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - width), float("-inf"))
    return torch.cat([logits, pad], dim=-1)
