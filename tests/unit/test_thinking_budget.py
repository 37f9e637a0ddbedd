"""The thinking-budget tracker forces the end of thinking after exactly `budget` thinking tokens."""

from tokenmill.sampling_params import SamplingParams
from tokenmill.sample.thinking_budget import ThinkingBudgetTracker

START, END, WRAP = 5, 6, 9


def run(tracker: ThinkingBudgetTracker, sampled: list[int]) -> list[int]:
    """Feed sampled tokens through the tracker as the runner does; return what is emitted."""
    emitted = []
    for token in sampled:
        forced = tracker.forced_token()
        chosen = token if forced is None else forced
        tracker.observe(chosen, forced=forced is not None)
        emitted.append(chosen)
    return emitted


def params(budget: int, starts_in_thinking: bool = False, end=(WRAP, END)) -> SamplingParams:
    return SamplingParams(
        thinking_token_budget=budget,
        thinking_start_token_id=START,
        thinking_end_token_ids=list(end),
        starts_in_thinking=starts_in_thinking,
    )


def test_budget_spent_forces_the_end_tokens_then_lets_the_model_answer():
    tracker = ThinkingBudgetTracker(params(3))
    emitted = run(tracker, [START, 20, 21, 22, 23, 24, 25, 26])
    assert emitted == [START, 20, 21, 22, WRAP, END, 25, 26]


def test_prompt_that_opened_thinking_counts_from_the_first_token():
    tracker = ThinkingBudgetTracker(params(2, starts_in_thinking=True, end=(END,)))
    assert run(tracker, [30, 31, 32, 33]) == [30, 31, END, 33]


def test_model_that_closes_thinking_itself_is_not_forced():
    tracker = ThinkingBudgetTracker(params(3))
    assert run(tracker, [START, 20, END, 40, 41, 42, 43]) == [START, 20, END, 40, 41, 42, 43]


def test_no_thinking_section_means_no_forcing():
    tracker = ThinkingBudgetTracker(params(1))
    assert run(tracker, [40, 41, 42, 43]) == [40, 41, 42, 43]


def test_zero_budget_closes_at_once():
    tracker = ThinkingBudgetTracker(params(0, starts_in_thinking=True, end=(END,)))
    assert run(tracker, [30, 31]) == [END, 31]
