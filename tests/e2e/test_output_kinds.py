"""Output kinds: deltas add up to the whole result, final_only answers once, cumulative keeps growing."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.e2e.conftest import make_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput


@pytest.fixture(scope="module")
def llm(checkpoint_dir) -> LLM:
    return LLM(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=512)


def run_to_end(llm: LLM, requests: dict[str, SamplingParams], prompt) -> dict[str, list[RequestOutput]]:
    """Add the requests to the engine together, step until all finish; every output, by request id."""
    for request_id, params in requests.items():
        llm.engine.add_request(request_id, prompt, params)
    outputs: dict[str, list[RequestOutput]] = defaultdict(list)
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            outputs[output.request_id].append(output)
    return outputs


def concat(deltas: list[RequestOutput]) -> dict[int, dict]:
    """Per sample index: the deltas' texts, ids and logprobs concatenated, and the finishes seen."""
    samples: dict[int, dict] = defaultdict(lambda: {"text": "", "ids": [], "logprobs": [], "finishes": []})
    for delta in deltas:
        for c in delta.outputs:
            sample = samples[c.index]
            assert not sample["finishes"], "a sample changed after it finished"
            sample["text"] += c.text
            sample["ids"] += c.token_ids
            sample["logprobs"] += c.logprobs or []
            sample["cumulative_logprob"] = c.cumulative_logprob
            if c.finish_reason is not None:
                sample["finishes"].append((c.finish_reason, c.stop_reason))
    return samples


def test_stream_deltas_add_up_to_generate_with_n_samples_stops_and_logprobs(llm):
    prompt = "def fibonacci(n):"
    base = dict(n=3, temperature=1.0, seed=11, max_tokens=40, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    free = llm.generate(prompt, SamplingParams(**base))[0].outputs[0].text
    assert len(free) > 8
    params = SamplingParams(**base, stop=[free[5:8]])  # sample 0 (same seed) stops there, mid-request
    final = llm.generate(prompt, params)[0]
    deltas = list(llm.stream(prompt, params))

    assert any(c.finish_reason == "stop" for c in final.outputs)
    samples = concat(deltas)
    assert sorted(samples) == [0, 1, 2]
    for completion in final.outputs:
        sample = samples[completion.index]
        assert sample["text"] == completion.text
        assert sample["ids"] == completion.token_ids
        assert sample["logprobs"] == completion.logprobs and len(sample["logprobs"]) == len(sample["ids"])
        assert sample["cumulative_logprob"] == pytest.approx(completion.cumulative_logprob)
        assert sample["finishes"] == [(completion.finish_reason, completion.stop_reason)]
    # The prompt fields come once, in the first output; only the last output is finished.
    assert deltas[0].prompt_token_ids == final.prompt_token_ids and deltas[0].prompt == prompt
    assert final.prompt_logprobs[0] is None and deltas[0].prompt_logprobs[0] is None
    for ours, theirs in zip(deltas[0].prompt_logprobs[1:], final.prompt_logprobs[1:], strict=True):
        assert ours.keys() == theirs.keys()  # values: the second run may reuse cached prompt blocks
        assert all(ours[t].logprob == pytest.approx(theirs[t].logprob, abs=1e-5) for t in ours)
    assert all(d.prompt_token_ids == [] and d.prompt is None and d.prompt_logprobs is None for d in deltas[1:])
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]


def test_final_only_answers_once_with_what_cumulative_ends_with(llm):
    prompt = {"prompt_token_ids": make_prompts(lengths=[20], seed=5)[0]}
    base = dict(n=2, temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, logprobs=1)
    outputs = run_to_end(llm, {"once": SamplingParams(**base, output_kind="final_only"),
                               "growing": SamplingParams(**base, output_kind="cumulative")}, prompt)
    assert len(outputs["once"]) == 1 and outputs["once"][0].finished
    growing = outputs["growing"]
    assert len(growing) >= 24  # the second sample starts a step after the first (it reuses its prompt)
    texts = [o.outputs[0].text for o in growing]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    counts = [len(o.outputs[1].token_ids) for o in growing]
    assert counts == sorted(counts) and counts[-1] == 24
    once, last = outputs["once"][0], growing[-1]
    for a, b in zip(once.outputs, last.outputs, strict=True):
        assert (a.index, a.text, a.token_ids, a.finish_reason) == (b.index, b.text, b.token_ids, b.finish_reason)
        # The two requests ran in different rows of the batch: float sums may differ in the last bits.
        assert [{t: (p.rank, p.decoded_token) for t, p in step.items()} for step in a.logprobs] == [
            {t: (p.rank, p.decoded_token) for t, p in step.items()} for step in b.logprobs]
        assert [p.logprob for step in a.logprobs for p in step.values()] == pytest.approx(
            [p.logprob for step in b.logprobs for p in step.values()], abs=1e-4)
    assert once.prompt_token_ids == last.prompt_token_ids == prompt["prompt_token_ids"]


def test_a_delta_carries_only_its_steps_tokens_however_long_the_request(llm):
    prompt = {"prompt_token_ids": make_prompts(lengths=[16], seed=7)[0]}
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True, logprobs=1)
    deltas = run_to_end(llm, {"long": SamplingParams(**{**params.__dict__, "output_kind": "delta"})}, prompt)["long"]
    final = llm.generate(prompt, params)[0].outputs[0]
    # One decode token per step: every delta holds exactly that token and its logprobs entry, also at the
    # end of the request, and never the history (checked after the run, so no list was appended to later).
    assert len(deltas) == 400
    assert all(len(d.outputs[0].token_ids) == 1 and len(d.outputs[0].logprobs) == 1 for d in deltas)
    tokenizer = llm.get_tokenizer()
    longest_piece = max(len(tokenizer.decode([t], skip_special_tokens=False)) for t in final.token_ids)
    assert len(final.text) > 10 * longest_piece
    # A delta's text is what its token completed: at most a few tokens' worth (a held-back partial character).
    assert max(len(d.outputs[0].text) for d in deltas) <= 4 * longest_piece
    assert "".join(d.outputs[0].text for d in deltas) == final.text


def test_output_kind_is_validated():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(output_kind="stream")
    assert info.value.field == "output_kind" and "final_only" in str(info.value)


def test_deltas_with_speculative_decoding_hold_every_token_a_step_accepted(checkpoint_dir):
    llm = LLM(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=512,
              speculative_method="ngram", num_speculative_tokens=3, speculative_adaptive=False)
    # A repetitive prompt gives the n-gram lookup drafts that the model accepts now and then.
    prompt = {"prompt_token_ids": make_prompts(lengths=[12], seed=4)[0] * 6}
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logprobs=0)
    final = llm.generate(prompt, params)[0].outputs[0]
    deltas = list(llm.stream(prompt, params))
    sizes = [len(d.outputs[0].token_ids) for d in deltas]
    assert sum(sizes) == 60 and max(sizes) > 1, sizes  # some step delivered several tokens at once
    assert all(len(d.outputs[0].logprobs) == n for d, n in zip(deltas, sizes))
    assert [t for d in deltas for t in d.outputs[0].token_ids] == final.token_ids
    assert "".join(d.outputs[0].text for d in deltas) == final.text
    assert deltas[-1].outputs[0].spec_decoding == final.spec_decoding
