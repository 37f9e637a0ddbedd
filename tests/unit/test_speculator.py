"""The speculator's adaptive choices with a scripted proposer: lookups are free, the draft model is not."""

from __future__ import annotations

import itertools

from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.cost_model import StepTimes
from tokenmill.spec_decode.measured_rates import LOOKUP, MODEL, PLAIN, MeasuredRates
from tokenmill.spec_decode.proposer import Draft, DraftRequest, Proposer
from tokenmill.spec_decode.speculator import Speculator
from tokenmill.sample.state import SamplingState


class ScriptedLookupThenModel(Proposer):
    """Request "lookup" always has a lookup draft; request "model" needs the draft model."""

    def __init__(self) -> None:
        self.model_calls = 0

    def propose_free(self, requests: list[DraftRequest]) -> list[Draft | None]:
        return [Draft([7, 7]) if r.req_id == "lookup" else None for r in requests]

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        self.model_calls += 1
        return [Draft([5, 5]) for _ in requests]


def decoding(req_id: str) -> DraftRequest:
    state = SamplingState(SamplingParams(temperature=0.0, max_tokens=1000), [1, 2], [3], None)
    return DraftRequest(req_id, [1, 2, 3], state, [0], 4)


def test_the_draft_model_is_left_out_where_steps_with_it_measured_slower():
    proposer = ScriptedLookupThenModel()
    speculator = Speculator(proposer, num_speculative_tokens=4)
    speculator.target_times = StepTimes([(1, 0.01), (64, 0.01)])  # flat: the cost model says drafting pays
    first = speculator.propose([decoding("lookup"), decoding("model")], num_other_tokens=0)
    assert first == {"lookup": [7, 7], "model": [5, 5]}
    previous, history = first, []
    for _ in range(60):
        proposals = speculator.propose([decoding("lookup"), decoding("model")], num_other_tokens=0)
        history.append(proposals)
        # The step that verified `previous`: every draft accepted, but the model's drafting cost 0.3 s.
        tokens = 2 + sum(len(d) for d in previous.values())
        seconds = 0.05 + (0.3 if "model" in previous else 0.0)
        speculator.observe_decode_step(2, tokens, seconds)
        previous = proposals
    late = history[-20:]
    assert all("lookup" in p for p in late), "lookups stay on: they make steps faster"
    assert sum("model" in p for p in late) <= 1, "the model only when it is retried"


def test_measured_rates_pick_the_fastest_arm_and_retry_the_others_less_and_less():
    rates = MeasuredRates(explore_every=4, max_explore_every=32, min_samples=2)
    both = [PLAIN, MODEL]
    # Nothing measured: the cost model's choice first, then the other arm, until each has two samples.
    assert rates.decide(8, both, preferred=MODEL) == MODEL
    rates.observe(8, MODEL, tokens=16, seconds=0.2)  # 80 tok/s
    rates.observe(8, MODEL, tokens=16, seconds=0.2)
    assert rates.decide(8, both, preferred=MODEL) == PLAIN
    rates.observe(8, PLAIN, tokens=8, seconds=0.05)  # 160 tok/s
    rates.observe(8, PLAIN, tokens=8, seconds=0.05)
    # Drafting measured slower at this batch size: plain, although the cost model still prefers drafting,
    # except for a retry now and then, less often each time it loses again.
    retried = []
    for step in range(200):
        arm = rates.decide(8, both, preferred=MODEL)
        if arm == MODEL:
            retried.append(step)
        rates.observe(8, arm, tokens=16 if arm == MODEL else 8, seconds=0.2 if arm == MODEL else 0.05)
    gaps = [b - a for a, b in itertools.pairwise(retried)]
    assert retried and gaps == sorted(gaps) and gaps[0] < 10 and 30 <= gaps[-1] <= 34
    # Other batch sizes are measured apart; an arm that is not open to a step is never chosen.
    assert rates.decide(1, [PLAIN, LOOKUP], preferred=LOOKUP) == LOOKUP
    assert rates.decide(8, [PLAIN], preferred=MODEL) == PLAIN
    # Where drafting measures faster, it is used even when the cost model would not draft.
    fast = MeasuredRates(explore_every=100)
    for _ in range(3):
        fast.observe(1, MODEL, tokens=3, seconds=0.03)
        fast.observe(1, PLAIN, tokens=1, seconds=0.02)
    assert fast.decide(1, [PLAIN, MODEL], preferred=PLAIN) == MODEL
    # A step that will not be measured takes the best measured arm and explores nothing.
    assert fast.decide(1, [PLAIN, LOOKUP, MODEL], preferred=LOOKUP, explore=False) == MODEL
    assert fast.decide(4, [PLAIN, MODEL], preferred=MODEL, explore=False) == MODEL  # nothing measured yet


def test_settled_plain_is_reported_until_a_retry_is_due():
    rates = MeasuredRates(explore_every=4, min_samples=1)
    assert not rates.plain_settled(8)  # nothing measured
    rates.observe(8, MODEL, tokens=16, seconds=0.2)
    rates.observe(8, PLAIN, tokens=8, seconds=0.05)
    assert rates.decide(8, [PLAIN, MODEL], preferred=MODEL) == PLAIN
    settled = []
    for _ in range(6):
        settled.append(rates.plain_settled(8))
        arm = rates.decide(8, [PLAIN] if settled[-1] else [PLAIN, MODEL], preferred=MODEL)
        rates.observe(8, arm, tokens=8, seconds=0.05)
    # Settled while the retry is not due; then the step that retries drafting is not skipped.
    assert settled[:3] == [True, True, True] and False in settled
    assert not MeasuredRates().plain_settled(1)
