"""Speculative decoding without a model: n-gram lookup, cost model, scheduler rollback, rejection sampler."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from tests.unit.test_scheduler import BS, add, make_scheduler
from tokenmill.core.sched_io import ModelRunnerOutput
from tokenmill.core.scheduler import Scheduler, SchedulerLimits
from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.cost_model import (
    AcceptanceTracker,
    StepCalibration,
    StepTimes,
    choose_batch_cap,
    expected_tokens,
    per_request_lengths,
)
from tokenmill.spec_decode.ngram import NgramProposer
from tokenmill.sample.rejection import VerifyRequest, verify_batch
from tokenmill.sample.state import SamplingState, make_generator

# ---- n-gram lookup ---------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_most_recent_match_of_the_longest_suffix():
    ngram = NgramProposer(min_n=1, max_n=3)
    # The suffix [1, 2] occurs at 0 (followed by 3, 4) and at 5 (followed by 9): the latest match wins.
    assert ngram.lookup([1, 2, 3, 4, 0, 1, 2, 9, 8, 1, 2], 2) == [9, 8]
    # The 3-gram [7, 1, 2] beats the more recent 2-gram match.
    assert ngram.lookup([7, 1, 2, 5, 6, 1, 2, 8, 7, 1, 2], 3) == [5, 6, 1]
    assert ngram.lookup([1, 2, 3], 4) == []  # nothing repeats
    # What followed the match reaches the end of the text: the text is periodic, and so is the draft.
    assert ngram.lookup([5, 5], 4) == [5, 5, 5, 5]
    assert ngram.lookup([1, 2, 3, 1, 2, 3, 1, 2], 4) == [3, 1, 2, 3]
    assert ngram.lookup([4, 1, 2, 9, 1, 2], 3) == [9, 1, 2]  # period 3: exactly what followed
    assert ngram.lookup([1, 2, 1], 0) == []


def test_ngram_respects_min_n():
    assert NgramProposer(min_n=2, max_n=3).lookup([1, 9, 8, 1], 2) == []
    assert NgramProposer(min_n=1, max_n=3).lookup([1, 9, 8, 1], 2) == [9, 8]
    with pytest.raises(ValueError):
        NgramProposer(min_n=3, max_n=2)


# ---- cost model ------------------------------------------------------------------------------------


def test_step_times_interpolate_and_extrapolate_linearly():
    times = StepTimes([(1, 1.0), (4, 1.0), (8, 2.0)])
    assert times(1) == 1.0
    assert times(2) == 1.0
    assert times(6) == pytest.approx(1.5)
    assert times(16) == pytest.approx(4.0)  # the last slope goes on


def test_expected_tokens_and_acceptance_tracker():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    tracker = AcceptanceTracker(prior_accepted=0.0, prior_rejected=0.0, decay=1.0)
    tracker.observe(4, 4)  # all accepted: no rejection
    tracker.observe(4, 2)  # two accepted, then a rejection
    assert tracker.rate == pytest.approx(6 / 7)


def test_a_request_kept_from_drafting_drifts_back_to_the_prior():
    tracker = AcceptanceTracker()
    tracker.observe(4, 0)
    tracker.observe(4, 0)
    low = tracker.rate
    assert low < 0.3
    for _ in range(10):
        tracker.idle()
    assert low < tracker.rate < 0.5
    for _ in range(40):
        tracker.idle()
    assert tracker.rate == pytest.approx(0.5, abs=0.01)


def test_per_request_lengths_follow_acceptance():
    assert per_request_lengths([0.9, 0.5, 0.05], [4, 4, 4], min_gain=0.2) == [4, 2, 0]
    assert per_request_lengths([0.9], [1], min_gain=0.2) == [1]


def test_batch_cap_keeps_drafts_while_steps_are_flat_and_drops_them_when_compute_bound():
    # Memory-bound: step time flat up to 64 tokens, then linear (compute-bound).
    target = StepTimes([(1, 1.0), (64, 1.0), (128, 2.0), (512, 8.0)])
    assert choose_batch_cap([0.8] * 4, [4] * 4, 0, target, None) == 4
    # At 64 decodes every extra token costs as much as a token is worth: drafting turns off.
    assert choose_batch_cap([0.6] * 64, [4] * 64, 0, target, None) == 0
    # A costly draft model turns drafting off even at batch 1 when acceptance is low.
    draft = StepTimes([(1, 0.5), (64, 0.5)])
    assert choose_batch_cap([0.1], [4], 0, target, draft) == 0
    assert choose_batch_cap([0.95], [4], 0, target, draft) > 0



def test_measured_step_costs_turn_drafting_off_and_retry_it_later():
    target = StepTimes([(1, 1.0), (64, 1.0), (128, 2.0), (512, 8.0)])
    rates, lengths = [0.5] * 32, [4] * 32
    assert choose_batch_cap(rates, lengths, 0, target, None) > 0  # the profile alone says drafting pays
    calibration = StepCalibration()
    for _ in range(20):  # verify steps really take 1.8x the prediction, plain steps exactly the prediction
        calibration.observe(predicted_s=2.0, measured_s=3.6, drafted=True)
        calibration.observe(predicted_s=1.0, measured_s=1.0, drafted=False)
    assert calibration.spec_cost_factor > 1.5
    assert choose_batch_cap(rates, lengths, 0, target, None, calibration.spec_cost_factor) == 0
    # While drafting is off only plain steps are measured: the factor drifts back, so drafting is retried.
    for _ in range(200):
        calibration.observe(predicted_s=1.0, measured_s=1.0, drafted=False)
    assert calibration.spec_cost_factor < 1.05
    assert choose_batch_cap(rates, lengths, 0, target, None, calibration.spec_cost_factor) > 0
    # A machine uniformly slower than its profile changes nothing: only the ratio of the two counts.
    uniform = StepCalibration()
    for _ in range(20):
        uniform.observe(2.0, 5.0, drafted=True)
        uniform.observe(1.0, 2.5, drafted=False)
    assert uniform.spec_cost_factor == pytest.approx(1.0, abs=0.05)

# ---- scheduler: drafts inside the budget, rollback, caching only verified blocks ------------------


def _run(sched: Scheduler, sampled: dict[str, list[int]], drafts: dict[str, list[int]] | None = None):
    out = sched.schedule()
    result = ModelRunnerOutput(
        req_ids=[c.req_id for c in out.chunks],
        sampled_token_ids=[sampled.get(c.req_id, [7]) if c.sample else [] for c in out.chunks],
        spec_token_ids=drafts or {},
    )
    updates = sched.update(out, result)
    return out, updates


def test_drafts_ride_in_the_step_and_rejections_roll_back():
    sched = make_scheduler(budget=32)
    req = add(sched, "a", 6, max_tokens=20)
    _run(sched, {"a": [100]}, {"a": [101, 102, 103]})
    assert req.num_computed_tokens == 6 and req.spec_token_ids == [101, 102, 103]
    out, _ = _run(sched, {"a": [101, 50]}, {"a": [1, 2]})  # draft 1 accepted, then a correction
    chunk = out.chunks[0]
    assert (chunk.start_pos, chunk.token_ids, chunk.num_spec_tokens) == (6, [100, 101, 102, 103], 3)
    assert req.output_token_ids == [100, 101, 50]
    assert req.num_computed_tokens == 8  # 100 and the accepted 101; 102, 103 rolled back
    assert req.spec_stats.num_draft_tokens == 3 and req.spec_stats.num_accepted_tokens == 1
    out, _ = _run(sched, {"a": [1, 2, 9]})
    assert out.chunks[0].start_pos == 8 and out.chunks[0].token_ids == [50, 1, 2]
    assert req.num_computed_tokens == 11 and req.output_token_ids[-3:] == [1, 2, 9]
    assert req.spec_stats.per_position_acceptance == [1.0, 0.5, 0.0]


def test_only_verified_full_blocks_enter_the_prefix_cache():
    sched = make_scheduler(budget=32)
    req = add(sched, "a", 3, max_tokens=20)
    _run(sched, {"a": [100]}, {"a": [101, 102, 103, 104]})
    # Computes 100 + four drafts (positions 3..7); only 100 is accepted: block 1 (positions 4..7) holds
    # rejected tokens and must not be cached.
    _run(sched, {"a": [55]}, {})
    assert req.num_computed_tokens == 4
    assert len(sched.kv.cache) == 1
    _run(sched, {"a": [56]}, {})
    assert req.num_computed_tokens == 5 and len(sched.kv.cache) == 1


def test_budget_trims_drafts_and_max_tokens_caps_them():
    sched = make_scheduler(budget=3)
    req = add(sched, "a", 3, max_tokens=4)
    _run(sched, {"a": [100]}, {"a": [1, 2, 3, 4, 5]})
    assert req.spec_token_ids == [1, 2]  # 4 tokens at most: 100, two drafts, one target token
    out, _ = _run(sched, {"a": [1, 2, 9]})
    assert out.chunks[0].token_ids == [100, 1, 2] and out.chunks[0].num_spec_tokens == 2
    assert req.is_finished and req.output_token_ids == [100, 1, 2, 9]


def test_stop_inside_accepted_drafts_drops_the_rest():
    sched = make_scheduler(budget=32)
    req = add(sched, "a", 3, max_tokens=20, stop_token_ids=[2])
    _run(sched, {"a": [100]}, {"a": [1, 2, 3]})
    _run(sched, {"a": [1, 2, 3, 4]})
    assert req.is_finished and req.output_token_ids == [100, 1, 2]
    assert sched.kv.num_used_blocks == 0


def test_lookahead_slots_are_reserved_for_a_draft_model():
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_lookahead_tokens=4)
    sched = Scheduler(limits, KVCacheManager(64, BS))
    add(sched, "a", 4, max_tokens=20)
    out, _ = _run(sched, {"a": [9]})
    assert len(out.chunks[0].block_table) == 2  # 4 prompt tokens + 4 lookahead slots


def test_preempted_request_loses_its_drafts_and_is_reported_resumed():
    sched = make_scheduler(num_blocks=4, budget=64)
    a = add(sched, "a", 4, max_tokens=40)
    add(sched, "b", 4, max_tokens=40, first=50)
    _run(sched, {}, {"a": [1, 2, 3], "b": [4, 5]})
    for _ in range(6):
        out, _ = _run(sched, {"a": [1], "b": [4]}, {"b": [4, 4]})
        if sched.num_preemptions:
            break
    assert sched.num_preemptions > 0
    victim = next(r for r in sched.requests.values() if r.num_preemptions)
    assert victim.spec_token_ids == []
    resumed_seen = False
    for _ in range(40):
        out = sched.schedule()
        resumed_seen |= victim.request_id in out.resumed_req_ids
        sched.update(out, ModelRunnerOutput([c.req_id for c in out.chunks], [[1] if c.sample else [] for c in out.chunks]))
        if resumed_seen:
            break
    assert resumed_seen
    assert a is not None


# ---- rejection sampler -----------------------------------------------------------------------------


def _state(temperature: float, **kw) -> SamplingState:
    return SamplingState(SamplingParams(temperature=temperature, max_tokens=100, **kw), [1, 2, 3], [], None)


def test_greedy_verification_accepts_the_matching_prefix_then_corrects():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 5, 6]):
        logits[row, best] = 5.0
    gen = make_generator(0, torch.device("cpu"))
    out = verify_batch(logits, [VerifyRequest(_state(0.0), [3, 4, 9], gen)])
    assert out == [[3, 4, 5]]
    out = verify_batch(logits, [VerifyRequest(_state(0.0), [3, 4, 5], gen)])
    assert out == [[3, 4, 5, 6]]  # all accepted plus the bonus token


def test_identical_draft_distribution_is_always_accepted():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    state = _state(1.0)
    probs = logits.softmax(-1)
    gen = make_generator(1, torch.device("cpu"))
    for _ in range(50):
        drafts = [int(torch.multinomial(probs[j], 1, generator=gen)) for j in range(3)]
        out = verify_batch(logits, [VerifyRequest(state, drafts, gen, probs[:3])])[0]
        assert out[:3] == drafts and len(out) == 4


@pytest.mark.parametrize("deterministic", [True, False])
def test_verified_tokens_follow_the_target_distribution(deterministic):
    """The first emitted token is distributed as p (after top-p) whatever the draft: chi-square."""
    vocab = 8
    target_logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    draft_probs = torch.tensor([0.05, 0.05, 0.4, 0.3, 0.1, 0.05, 0.03, 0.02])
    state = _state(0.8, top_p=0.9)
    from tokenmill.sample.sampler import probs_rows

    p = probs_rows(target_logits[None], [state])[0]
    gen = make_generator(3, torch.device("cpu"))
    logits = target_logits.repeat(2, 1)
    counts = torch.zeros(vocab)
    num = 6000
    for _ in range(num):
        if deterministic:
            drafts, q = [3], None
        else:
            drafts = [int(torch.multinomial(draft_probs, 1, generator=gen))]
            q = draft_probs[None]
        first = verify_batch(logits, [VerifyRequest(state, drafts, gen, q)])[0][0]
        counts[first] += 1
    keep = p > 0
    assert counts[~keep].sum() == 0  # nothing outside top-p ever appears
    result = chisquare(counts[keep].numpy(), (p[keep] * num).numpy())
    assert result.pvalue > 0.01, (counts, p * num)
