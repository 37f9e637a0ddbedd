"""Asynchronous scheduling (step n+1 planned and run while step n's results are applied) never changes what
requests get: greedy and seeded outputs equal the synchronous engine's across batching, chunked prefill,
prefix hits, preemption, stops, aborts and failures; no token computed after a stop is ever emitted; the
pool is whole again afterwards."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import make_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.engine.async_loop import plan_ahead_blocker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def path(checkpoint_dir) -> str:
    return str(checkpoint_dir("llama"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(seed=3, lengths=[1, 7, 16, 33, 64, 129])


def make(path: str, async_scheduling: bool, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 512)
    return LLM(model=path, dtype="float32", async_scheduling=async_scheduling, **kwargs)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


def ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def both(path: str, prompts, params=GREEDY, **kwargs):
    """(synchronous outputs, asynchronous outputs, the asynchronous LLM)."""
    planned = make(path, True, **kwargs)
    assert planned.engine.async_scheduling
    return run(make(path, False, **kwargs), prompts, params), run(planned, prompts, params), planned


@pytest.mark.parametrize("kwargs", [{}, {"max_num_batched_tokens": 16}, {"num_kv_blocks": 20, "max_model_len": 256},
                                    {"enable_prefix_caching": False}],
                         ids=["batched", "chunked prefill", "preemption", "no prefix cache"])
def test_greedy_outputs_are_the_same_with_and_without_async_scheduling(path, prompts, kwargs):
    sync, planned, llm = both(path, prompts, **kwargs)
    assert ids(planned) == ids(sync)
    stats = llm.engine.stats()
    assert stats["kv_blocks_used"] == 0 and not llm.engine.has_unfinished_requests()
    if "num_kv_blocks" in kwargs:
        assert stats["num_preemptions"] > 0
    again = run(llm, prompts)  # every prompt now hits the prefix cache (when it is on)
    assert ids(again) == ids(sync)
    if kwargs.get("enable_prefix_caching", True) and "num_kv_blocks" not in kwargs:
        assert max(o.num_cached_tokens for o in again) >= 128


def test_step_counts_match_when_max_tokens_ends_every_request(path, prompts):
    sync, planned = make(path, False), make(path, True)
    run(sync, prompts)
    run(planned, prompts)
    assert planned.engine.num_steps == sync.engine.num_steps == NEW


def test_staggered_arrivals_give_the_same_output(path, prompts):
    results = []
    for async_scheduling in (False, True):
        engine = make(path, async_scheduling, max_num_batched_tokens=64).engine
        finished: dict[str, list[int]] = {}
        pending = list(enumerate(prompts))
        step = 0
        while pending or engine.has_unfinished_requests():
            if pending and step % 3 == 0:
                index, prompt = pending.pop(0)
                engine.add_request(f"r{index}", {"prompt_token_ids": prompt}, GREEDY)
            for output in engine.step():
                assert output.request_id not in finished, "an output after the request finished"
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
            step += 1
        results.append(finished)
        assert engine.kv_manager.num_used_blocks == 0
    assert results[0] == results[1]


def test_stop_token_ids_and_max_tokens_stop_at_the_same_token(path, prompts):
    reference = ids(run(make(path, False), prompts))
    # Each request stops at its own fourth token (a stop id), or at its own max_tokens.
    params = [SamplingParams(temperature=0.0, max_tokens=NEW, stop_token_ids=[ref[0][3]]) if i % 2 else
              SamplingParams(temperature=0.0, max_tokens=3 + i, ignore_eos=True) for i, ref in enumerate(reference)]
    sync, planned, llm = both(path, prompts, params)
    assert ids(planned) == ids(sync)
    assert [o.outputs[0].finish_reason for o in planned] == [o.outputs[0].finish_reason for o in sync]
    for i, output in enumerate(planned):
        tokens = output.outputs[0].token_ids
        if i % 2:  # the token computed after the stop never appears
            assert tokens == reference[i][0][: reference[i][0].index(reference[i][0][3]) + 1]
        else:
            assert len(tokens) == 3 + i
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_stop_strings_end_the_text_at_the_same_place(path, prompts):
    texts = [o.outputs[0].text for o in run(make(path, False), prompts)]
    stops = [text[len(text) // 3: len(text) // 3 + 2] for text in texts]
    params = [SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, stop=[s]) for s in stops if s]
    chosen = [p for p, s in zip(prompts, stops) if s]
    sync, planned, llm = both(path, chosen, params)
    assert [o.outputs[0].text for o in planned] == [o.outputs[0].text for o in sync]
    assert ids(planned) == ids(sync)
    assert {o.outputs[0].finish_reason for o in planned} == {"stop"}
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_with_penalties_and_logprobs_is_the_same(path, prompts):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=12, ignore_eos=True,
                            repetition_penalty=1.3, presence_penalty=0.5, logprobs=2)
    sync, planned, _ = both(path, prompts[:4], params)
    assert ids(planned) == ids(sync)
    # The same tokens and ranks; the values to float noise (siblings may share a batch at a different step).
    for mine, theirs in zip(planned, sync):
        for a, b in zip(mine.outputs, theirs.outputs):
            assert [{k: v.rank for k, v in d.items()} for d in a.logprobs] == \
                [{k: v.rank for k, v in d.items()} for d in b.logprobs]
            assert [v.logprob for d in a.logprobs for v in d.values()] == \
                pytest.approx([v.logprob for d in b.logprobs for v in d.values()], abs=1e-4)


def test_prompt_logprobs_are_the_same(path, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=1)
    sync, planned, _ = both(path, prompts[:3], params, max_num_batched_tokens=16)
    assert [o.prompt_logprobs for o in planned] == [o.prompt_logprobs for o in sync]


def test_an_abort_while_steps_are_in_flight_leaves_the_others_unchanged(path, prompts):
    results = []
    for async_scheduling in (False, True):
        engine = make(path, async_scheduling).engine
        for index, prompt in enumerate(prompts):
            engine.add_request(f"r{index}", {"prompt_token_ids": prompt}, GREEDY)
        finished: dict[str, list[int]] = {}
        for step in range(200):
            if step == 4:
                engine.abort_request("r2")
            for output in engine.step():
                assert output.request_id != "r2" or step < 4
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
            if not engine.has_unfinished_requests():
                break
        engine.step()  # an empty step hands the worker the last finished ids
        assert engine.kv_manager.num_used_blocks == 0 and not engine.worker.states
        results.append(finished)
    assert "r2" not in results[1] and results[0] == results[1]


def test_a_grammar_constrained_request_makes_the_steps_synchronous(path, prompts):
    from tokenmill.structured.params import StructuredOutputParams

    grammar = StructuredOutputParams(regex="[a-c]{3,6}")
    params = [SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=grammar)] + [GREEDY] * 2
    sync, planned, llm = both(path, prompts[:3], params)
    assert ids(planned) == ids(sync)
    assert plan_ahead_blocker(llm.engine.scheduler.requests.values()) is None
    llm.engine.add_request("g", {"prompt_token_ids": prompts[0]}, params[0])
    assert "grammar" in plan_ahead_blocker(llm.engine.scheduler.requests.values())
    llm.engine.abort_request("g")


def test_speculative_decoding_keeps_the_synchronous_engine(path):
    llm = make(path, True, speculative_method="ngram")
    assert llm.engine.async_scheduling is False


def test_the_default_is_off_on_the_cpu(path):
    assert make(path, None).engine.async_scheduling is False


@pytest.fixture(scope="module")
def planned_engine(checkpoint_dir):
    from tokenmill.config import CacheConfig, EngineConfig
    from tokenmill.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=256,
                                  cache=CacheConfig(num_kv_blocks=128), async_scheduling=True))


def test_a_failing_detokenizer_fails_its_request_alone(planned_engine, monkeypatch):
    from tests.e2e.test_request_isolation import _assert_only_the_poison_failed, _run
    from tokenmill.engine.output_builder import RequestGroup

    original = RequestGroup.append_tokens

    def broken(self, child, token_ids, logprobs):
        if self.request_id == "poison":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return original(self, child, token_ids, logprobs)

    monkeypatch.setattr(RequestGroup, "append_tokens", broken)
    finished, failures = _run(planned_engine, SamplingParams(max_tokens=12, ignore_eos=True))
    _assert_only_the_poison_failed(finished, failures)
    planned_engine.step()
    assert planned_engine.kv_manager.num_used_blocks == 0 and not planned_engine.worker.states


def test_a_request_whose_state_fails_is_left_out_of_the_step_planned_after_it(planned_engine, monkeypatch):
    from tests.e2e.test_request_isolation import _assert_only_the_poison_failed, _run

    worker = planned_engine.worker
    original = type(worker)._new_state

    def broken(self, new):
        if new.req_id == "poison":
            raise RuntimeError("state bug")
        return original(self, new)

    monkeypatch.setattr(type(worker), "_new_state", broken)
    finished, failures = _run(planned_engine, SamplingParams(max_tokens=12, ignore_eos=True))
    _assert_only_the_poison_failed(finished, failures)
    assert "state bug" not in str(failures["poison"])


@pytest.mark.parametrize("poison_after_steps", [0, 3], ids=["same first step", "among decodes"])
def test_a_request_that_makes_the_forward_fail_is_aborted_alone(planned_engine, poison_after_steps):
    from tests.e2e.test_request_isolation import POISON_POSITION, _forward_fails_past, _victim_tokens

    plain: list[int] = []
    hook = _forward_fails_past(planned_engine, 10**9, plain)
    try:
        expected, _ = _victim_tokens(planned_engine, poison_after_steps=None)
    finally:
        hook.remove()
    forwards: list[int] = []
    hook = _forward_fails_past(planned_engine, POISON_POSITION, forwards)
    try:
        tokens, failures = _victim_tokens(planned_engine, poison_after_steps)
    finally:
        hook.remove()
    assert tokens == expected and set(failures) == {"poison"}
    planned_engine.step()
    assert planned_engine.kv_manager.num_used_blocks == 0 and not planned_engine.worker.states
    # Bisected once: the step planned after the failing one leaves the poison out whole.
    assert len(forwards) - len(plain) <= 2 * 3 + 1


def test_a_step_failure_no_request_causes_fails_the_step_and_the_engine_goes_on(planned_engine):
    from tests.e2e.test_request_isolation import _forward_fails_past

    forwards: list[int] = []
    hook = _forward_fails_past(planned_engine, 0, forwards)
    try:
        for index in range(3):
            planned_engine.add_request(f"r{index}", [5, 6, 7 + index], GREEDY)
        with pytest.raises(RuntimeError, match="kernel fault"):
            planned_engine.step()
    finally:
        hook.remove()
    # The plans were undone: the requests run again from their prompts, to the full length.
    finished = {}
    while planned_engine.has_unfinished_requests():
        for output in planned_engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert sorted(finished) == ["r0", "r1", "r2"] and {len(t) for t in finished.values()} == {NEW}
    planned_engine.step()
    assert planned_engine.kv_manager.num_used_blocks == 0


def test_padded_graph_steps_take_their_placeholders_in_the_captured_buffers(path, prompts, monkeypatch):
    """CUDA graphs replay decode steps from fixed buffers: the placeholder gather must land in them (the
    stand-in capture checks the addresses and runs the forward again on what they hold)."""
    from tests.unit.test_cuda_graphs import EagerCapture

    capture = EagerCapture()
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (12, 4, 20, 7, 9, 5)]
    with monkeypatch.context() as patch:
        patch.setattr("tokenmill.worker.worker.graphs_usable", lambda *args: True)
        patch.setattr("tokenmill.worker.worker.capture_cuda_graph", lambda: capture)
        graphed = make(path, True, max_num_seqs=6, num_kv_blocks=64, max_model_len=256)
    assert ids(run(graphed, prompts, params)) == ids(run(make(path, False, max_model_len=256), prompts, params))
    assert set(capture.replays) >= {6, 4, 2, 1}
