"""Sampler: greedy, filtered distributions (chi-square), seeds independent of the batch, penalties, logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tokenmill.sampling_params import SamplingParams
from tokenmill.sample.sampler import Sampler, compute_logprobs
from tokenmill.sample.shaping import apply_penalties, shape_logits
from tokenmill.sample.state import SamplingState, make_generator

VOCAB = 12
LOGITS = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 1.5


def state(seed: int | None = None, prompt=(), output=(), **params) -> SamplingState:
    p = SamplingParams(seed=seed, **params)
    generator = None if seed is None else make_generator(seed, torch.device("cpu"))
    return SamplingState(p, list(prompt), list(output), generator)


def expected_distribution(temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """The target distribution computed independently, in float64 numpy."""
    logits = LOGITS.double().numpy() / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep = np.ones(VOCAB, dtype=bool)
    order = np.argsort(-probs)
    if top_k > 0:
        keep[order[top_k:]] = False
    restricted = np.where(keep, probs, 0.0)
    restricted /= restricted.sum()
    if top_p < 1.0:
        mass = 0.0
        for rank, token in enumerate(order):
            if rank > 0 and mass >= top_p:
                keep[token] = False
            mass += restricted[token]
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    if min_p > 0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize(
    "filters",
    [dict(temperature=0.7), dict(temperature=1.0, top_k=4), dict(temperature=1.0, top_p=0.8),
     dict(temperature=1.2, min_p=0.1), dict(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05)],
)
def test_frequencies_match_the_filtered_softmax(filters):
    draws = 20_000
    sampler = Sampler(global_seed=123)
    logits = LOGITS.repeat(draws, 1)
    tokens = torch.tensor(sampler(logits, [state(**filters) for _ in range(draws)]).token_ids)
    observed = torch.bincount(tokens, minlength=VOCAB).numpy()
    expected = expected_distribution(**filters)
    assert observed[expected == 0].sum() == 0, "a filtered-out token was sampled"
    support = expected > 0
    assert chisquare(observed[support], expected[support] * draws).pvalue > 0.001


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    states = [state(temperature=0.0), state(temperature=1.0), state(temperature=0.0), state(temperature=0.5)]
    out = Sampler()(logits, states)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()


def test_a_seeded_row_ignores_its_batch_and_row_index():
    generator = torch.Generator().manual_seed(2)
    steps = [torch.randn(8, VOCAB, generator=generator) for _ in range(5)]

    def run(batch_size: int, row: int) -> list[int]:
        seeded = state(seed=42, temperature=1.0)
        others = [state(seed=None if i % 2 else 7 + i, temperature=1.0) for i in range(batch_size - 1)]
        states = others[:row] + [seeded] + others[row:]
        sampler = Sampler(global_seed=row)
        tokens = []
        for logits in steps:
            batch = logits[:batch_size].clone()
            batch[row] = logits[0]
            tokens.append(sampler(batch, states).token_ids[row])
        return tokens

    alone = run(1, 0)
    assert run(8, 0) == alone
    assert run(8, 5) == alone
    assert run(3, 2) == alone


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_penalties(logits, [state(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    out = apply_penalties(
        logits, [state(prompt=[3, 3], output=[1, 1, 2], frequency_penalty=0.5, presence_penalty=0.25)]
    )
    assert torch.allclose(out, torch.tensor([[0.0, -1.25, -0.75, 0.0]]))


def test_penalties_steer_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    states = [state(temperature=0.0, output=[0], presence_penalty=1.0)]
    out = Sampler()(shape_logits(logits, states), states)
    assert out.token_ids == [1]


def test_logprobs_are_of_the_raw_distribution_with_rank_and_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    raw = torch.log_softmax(logits, dim=-1)[0]
    out = Sampler()(logits, [state(temperature=0.0, logprobs=2)])
    token, logprob, rank, top = out.logprobs[0]
    assert token == 1 and rank == 1 and logprob == pytest.approx(raw[1].item())
    assert [t for t, _ in top] == [1, 2]
    assert top[1][1] == pytest.approx(raw[2].item())
    none = Sampler()(logits, [state(temperature=0.0, logprobs=0)]).logprobs[0]
    assert none[3] == [] and none[1] == pytest.approx(raw[1].item())
    assert Sampler()(logits, [state(temperature=0.0)]).logprobs == [None]


def test_compute_logprobs_ranks_a_given_token():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    entries = compute_logprobs(logits, torch.tensor([2, 3]), num_top=1)
    assert [(e[0], e[2]) for e in entries] == [(2, 2), (3, 2)]
    assert entries[0][3][0][0] == 1 and entries[1][3][0][0] == 2
