"""merge_deltas: consecutive delta outputs of one request merge into the delta of them all."""

from __future__ import annotations

from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput, merge_deltas


def lp(token_id: int) -> dict[int, Logprob]:
    return {token_id: Logprob(-float(token_id), 1, str(token_id))}


def test_samples_in_different_outputs_merge_by_index_in_order():
    first = RequestOutput("r", "p", [1, 2],
                          [CompletionOutput(0, "a", [10], logprobs=[lp(10)], cumulative_logprob=-10.0)],
                          prompt_logprobs=[None, lp(2)])
    second = RequestOutput("r", None, [], [
        CompletionOutput(1, "x", [20], logprobs=[lp(20)], cumulative_logprob=-20.0),
        CompletionOutput(0, "b", [11], logprobs=[lp(11)], cumulative_logprob=-21.0, finish_reason="stop",
                         stop_reason="\n"),
    ])
    third = RequestOutput("r", None, [], [CompletionOutput(1, "yz", [21, 22], logprobs=[lp(21), lp(22)],
                                                           cumulative_logprob=-63.0, finish_reason="length")],
                          finished=True, num_cached_tokens=16)
    merged = merge_deltas([first, second, third])
    assert (merged.prompt, merged.prompt_token_ids, merged.prompt_logprobs) == ("p", [1, 2], [None, lp(2)])
    assert merged.finished and merged.num_cached_tokens == 16
    zero, one = merged.outputs
    assert (zero.index, zero.text, zero.token_ids, zero.logprobs) == (0, "ab", [10, 11], [lp(10), lp(11)])
    assert (zero.finish_reason, zero.stop_reason, zero.cumulative_logprob) == ("stop", "\n", -21.0)
    assert (one.index, one.text, one.token_ids) == (1, "xyz", [20, 21, 22])
    assert one.logprobs == [lp(20), lp(21), lp(22)] and one.finish_reason == "length"
    # The inputs are left as they were: merging copies into new lists.
    assert first.outputs[0].token_ids == [10] and first.outputs[0].logprobs == [lp(10)]


def test_one_output_merges_to_itself_and_missing_logprobs_stay_none():
    only = RequestOutput("r", None, [3], [CompletionOutput(0, "t", [5])])
    assert merge_deltas([only]) is only
    merged = merge_deltas([only, RequestOutput("r", None, [], [CompletionOutput(0, "u", [6])], finished=True)])
    assert merged.outputs[0].logprobs is None and merged.outputs[0].text == "tu" and merged.prompt_token_ids == [3]
