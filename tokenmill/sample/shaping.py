"""The one logits-shaping function: every rule that changes a request's next-token distribution.

Plain sampling, draft sampling and draft verification all shape through here, so the target's p and the
draft's q see the same rules, which is what makes verification lossless. In order: repetition /
frequency / presence penalties, the grammar's token mask, the min-tokens ban on EOS and stop ids (unless
the grammar allows nothing else: the grammar wins), and the thinking budget's forced token. Temperature
and the top-k/p/min-p filters belong to sampling itself (sampler.apply_filters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.sample.bitmask import apply_bitmask
from tokenmill.sample.state import SamplingState
from tokenmill.sampling_params import SamplingParams


def shape_logits(
    logits: torch.Tensor,
    states: Sequence[SamplingState],
    generated: Sequence[Sequence[int]] | None = None,
    grammar_mask: tuple[torch.Tensor, Sequence[int]] | None = None,
    forced: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """[rows, vocab] logits after the request rules; `logits` itself (unmodified) when none applies.

    generated[i]: the tokens generated before row i's position (default: its state's output so far; a draft
    position also counts the drafts before it). grammar_mask: a packed token bitmask whose row i masks logits
    row rows[i]. forced[i]: a token row i must produce (the thinking budget), or None.
    """
    tokens = [s.output_token_ids for s in states] if generated is None else generated
    shaped = logits
    if any(has_penalties(s.params) for s in states):
        shaped = apply_penalties(shaped, states, tokens)
    if grammar_mask is not None and len(grammar_mask[1]):
        shaped = shaped.clone() if shaped is logits else shaped
        bitmask, rows = grammar_mask
        index = torch.as_tensor(list(rows), dtype=torch.long, device=shaped.device)
        selected = shaped.index_select(0, index)
        apply_bitmask(selected, bitmask)
        shaped.index_copy_(0, index, selected)
    bans = [(row, ids) for row, (s, t) in enumerate(zip(states, tokens)) if (ids := min_tokens_banned_ids(s.params, len(t)))]
    if bans:
        shaped = shaped.clone() if shaped is logits else shaped
        for row, ids in bans:
            kept = shaped[row].clone()
            shaped[row, ids] = float("-inf")
            # When the grammar allows only EOS while min_tokens forbids it, the ban yields; decided on the
            # device (torch.where), so the step does not wait for it.
            shaped[row] = torch.where(torch.isinf(shaped[row]).all(), kept, shaped[row])
    if forced is not None and any(t is not None for t in forced):
        shaped = shaped.clone() if shaped is logits else shaped
        for row, token in enumerate(forced):
            if token is not None:
                shaped[row] = float("-inf")
                shaped[row, token] = 0.0
    return shaped


def min_tokens_banned_ids(params: SamplingParams, num_generated: int) -> list[int]:
    """Until min_tokens are generated, EOS and stop ids cannot be sampled (as in vLLM)."""
    if num_generated >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(params.eos_token_ids))


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def apply_penalties(
    logits: torch.Tensor, states: Sequence[SamplingState], generated: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """Repetition (prompt + output, HF style), then frequency / presence (output only, OpenAI style)."""
    device, vocab = logits.device, logits.shape[-1]
    tokens = [s.output_token_ids for s in states] if generated is None else generated
    repetition = torch.tensor([s.params.repetition_penalty for s in states], device=device)[:, None]
    frequency = torch.tensor([s.params.frequency_penalty for s in states], device=device)[:, None]
    presence = torch.tensor([s.params.presence_penalty for s in states], device=device)[:, None]
    output_counts = _token_counts(tokens, vocab, device)
    if any(s.params.repetition_penalty != 1.0 for s in states):  # from the params: no device sync
        prompt_counts = _token_counts([s.prompt_token_ids for s in states], vocab, device)
        seen = (prompt_counts + output_counts) > 0
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def _token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] counts of each token in each row's list."""
    counts = torch.zeros(len(token_lists), vocab_size, device=device)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids = torch.tensor(list(tokens), dtype=torch.int64, device=device)
            counts[row].index_add_(0, ids, torch.ones(len(tokens), device=device))
    return counts
