"""The step's tokens from its logits: sample plain rows, verify drafts, prompt logprobs, and record them.

Every row's distribution is shaped by sample.shaping.shape_logits (penalties, grammar mask, min-tokens,
thinking budget) before sampling or verification, so drafting, verifying and plain sampling agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tokenmill.core.sched_io import ModelRunnerOutput, ScheduledChunk, TokenLogprobs
from tokenmill.sample.rejection import VerifyRequest, verify_batch
from tokenmill.sample.sampler import Sampler, compute_logprobs
from tokenmill.sample.shaping import has_penalties, shape_logits
from tokenmill.sample.state import SamplingState
from tokenmill.worker.drafter import Drafter
from tokenmill.worker.request_failures import RequestFailures


def is_plain_greedy(state: SamplingState) -> bool:
    """Nothing but argmax to do for this request's next token."""
    params = state.params
    return (params.temperature == 0.0 and params.logprobs is None and state.grammar is None and state.thinking is None
            and not has_penalties(params) and len(state.output_token_ids) >= params.min_tokens)


def sample_plain(
    sampler: Sampler,
    logits: torch.Tensor,
    states: Sequence[SamplingState],
    grammar_mask: tuple[torch.Tensor, list[int]] | None,
    forced: Sequence[int | None],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One token per row (row i of logits belongs to states[i]), and its logprobs when asked.

    grammar_mask: (bitmask, rows): bitmask row j constrains logits row rows[j]. forced[i]: the token the
    thinking budget forces on row i (or None); the caller reports the outcome to each request's tracker."""
    if grammar_mask is None and all(is_plain_greedy(s) for s in states):
        return logits.argmax(dim=-1).tolist(), [None] * len(states)
    shaped = shape_logits(logits, states, grammar_mask=grammar_mask, forced=list(forced))
    result = sampler(shaped, states, raw_logits=logits)
    return result.token_ids, result.logprobs


def record(state: SamplingState, tokens: Sequence[int]) -> None:
    """The request emitted these tokens: its grammar and output follow."""
    if state.grammar is not None:
        for token in tokens:
            state.grammar.accept_token(token)
    state.output_token_ids.extend(tokens)


def verify_drafts(
    drafter: Drafter,
    default_generator: torch.Generator,
    chunks: Sequence[ScheduledChunk],
    states: Sequence[SamplingState],
    row_starts: Sequence[int],
    logits: torch.Tensor,
) -> list[tuple[list[int], list[TokenLogprobs]]]:
    """Check each chunk's drafts against the target: accepted drafts plus one token, and their logprobs."""
    requests, rows = [], []
    for chunk, state, row in zip(chunks, states, row_starts):
        drafts = chunk.token_ids[len(chunk.token_ids) - chunk.num_spec_tokens :]
        generator = state.generator if state.generator is not None else default_generator
        requests.append(VerifyRequest(state, drafts, generator, drafter.take_draft_probs(chunk.req_id, len(drafts))))
        rows.extend(range(row, row + 1 + len(drafts)))
    verify_logits = logits[rows]
    results = []
    offset = 0
    for chunk, request, emitted in zip(chunks, requests, verify_batch(verify_logits, requests)):
        drafter.observe(chunk.req_id, len(request.draft_token_ids), len(emitted) - 1)
        entries: list[TokenLogprobs] = []
        if request.state.params.logprobs is not None:
            own = verify_logits[offset : offset + len(emitted)]
            entries = compute_logprobs(own, torch.tensor(emitted, device=logits.device), request.state.params.logprobs)
        results.append((emitted, entries))
        offset += len(request.draft_token_ids) + 1
    return results


def prompt_logprobs(
    chunks: Sequence[ScheduledChunk], states: dict[str, SamplingState], hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor], output: ModelRunnerOutput,
) -> None:
    """Logprobs of prompt tokens start_pos+1 .. for chunks that asked; position p predicts token p+1."""
    offset = 0
    for chunk in chunks:
        length = len(chunk.token_ids)
        if chunk.want_prompt_logprobs and chunk.req_id in states:  # a request that failed has no state
            state = states[chunk.req_id]
            prompt = state.prompt_token_ids
            end = min(chunk.start_pos + length, len(prompt) - 1)
            count = end - chunk.start_pos
            if count > 0:
                logits = compute_logits(hidden[offset : offset + count])
                targets = torch.tensor(prompt[chunk.start_pos + 1 : end + 1], device=logits.device)
                entries = compute_logprobs(logits, targets, state.params.prompt_logprobs or 0)
                output.prompt_logprobs.setdefault(chunk.req_id, []).extend(entries)
        offset += length


def forced_tokens(chunks: list[ScheduledChunk], plain: list[tuple[int, int]], states: dict[str, SamplingState],
                  failures: RequestFailures) -> dict[str, int]:
    """Tokens the thinking budget forces this step, per request (each request's tracker guarded alone)."""
    forced: dict[str, int] = {}
    for chunk_index, _ in plain:
        req_id = chunks[chunk_index].req_id
        thinking = states[req_id].thinking
        if thinking is None or req_id in failures:
            continue
        with failures.guard(req_id):
            token = thinking.forced_token()
            if token is not None:
                forced[req_id] = token
    return forced
