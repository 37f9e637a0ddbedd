"""Inside a step, a request whose own work fails (thinking budget, grammar matching, detokenizing) is aborted
alone with its own error; the other requests of the same steps finish with every token."""

from __future__ import annotations

import pytest

from tokenmill.config import CacheConfig, EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.output_builder import RequestGroup
from tokenmill.errors import RequestFailedError
from tokenmill.sample.thinking_budget import ThinkingBudgetTracker
from tokenmill.sampling_params import SamplingParams

VICTIM = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def engine(checkpoint_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=256,
                                  cache=CacheConfig(num_kv_blocks=128)))


def _run(engine: LLMEngine, poison: SamplingParams) -> tuple[dict, dict]:
    for index in range(3):
        engine.add_request(f"victim-{index}", [5, 6, 7 + index], VICTIM)
    engine.add_request("poison", [5, 6, 9], poison)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished, engine.take_failures()


def _assert_only_the_poison_failed(finished: dict, failures: dict) -> None:
    assert set(failures) == {"poison"} and isinstance(failures["poison"], RequestFailedError)
    for index in range(3):
        assert len(finished[f"victim-{index}"].outputs[0].token_ids) == VICTIM.max_tokens
    assert "poison" not in finished


def test_a_failing_thinking_budget_fails_its_request_alone(engine, monkeypatch):
    def broken(self):
        raise RuntimeError("tracker bug")

    monkeypatch.setattr(ThinkingBudgetTracker, "forced_token", broken)
    finished, failures = _run(engine, SamplingParams(max_tokens=12, thinking_token_budget=2,
                                                     thinking_start_token_id=5, thinking_end_token_ids=[6]))
    _assert_only_the_poison_failed(finished, failures)
    assert failures["poison"].field is None and "tracker bug" not in str(failures["poison"])


def test_a_failing_detokenizer_fails_its_request_alone(engine, monkeypatch):
    original = RequestGroup.append_tokens

    def broken(self, child, token_ids, logprobs):
        if self.request_id == "poison":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return original(self, child, token_ids, logprobs)

    monkeypatch.setattr(RequestGroup, "append_tokens", broken)
    finished, failures = _run(engine, SamplingParams(max_tokens=12, ignore_eos=True))
    _assert_only_the_poison_failed(finished, failures)
    assert engine.kv_manager.num_used_blocks == 0


def test_a_grammar_that_cannot_be_matched_fails_its_request_alone(engine):
    """Its costly part starts past the tokens the compile walks, so only a step finds it."""
    from tokenmill.structured.params import StructuredOutputParams

    finished, failures = _run(engine, SamplingParams(max_tokens=40, structured_outputs=StructuredOutputParams(
        regex="[a-z ]{20}x{1000}{1000}")))
    _assert_only_the_poison_failed(finished, failures)
    assert failures["poison"].field == "guided_regex"


def test_a_grammar_that_fails_in_its_first_tokens_is_refused_before_it_is_queued(engine):
    from tokenmill.errors import InvalidRequestError
    from tokenmill.structured.params import StructuredOutputParams

    recursive = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                 "required": ["next"]}}, "$ref": "#/$defs/n"}
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("poison", [5, 6, 9], SamplingParams(
            max_tokens=12, structured_outputs=StructuredOutputParams(json=recursive, source="tools")))
    assert info.value.field == "tools" and not engine.has_unfinished_requests()


# ---- a model pass that fails because of one request ---------------------------------------------------------

POISON_POSITION = 64  # victims never get this far; the poison's prompt does


def _forward_fails_past(engine: LLMEngine, position: int, counter: list[int]):
    """A test hook in the model: its forward raises after every layer wrote its KV, when the step holds a token
    at `position` or later (as a kernel bug tripped by one request's shape would)."""
    def after_forward(module, args, output):
        counter.append(1)
        if int(args[1].max()) >= position:
            raise RuntimeError("kernel fault quoting the poison's secret input")

    return engine.worker.model.model.register_forward_hook(after_forward)


def _victim_tokens(engine: LLMEngine, poison_after_steps: int | None) -> tuple[dict[str, list[int]], dict]:
    for index in range(6):
        engine.add_request(f"victim-{index}", [5, 6, 7 + index, 8 + index], VICTIM)
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        if steps == poison_after_steps:
            engine.add_request("poison", list(range(10, 10 + POISON_POSITION + 8)), VICTIM)
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.outputs[0].token_ids
        steps += 1
    return tokens, engine.take_failures()


@pytest.mark.parametrize("poison_after_steps", [0, 3], ids=["same first step", "among decodes"])
def test_a_request_that_makes_the_forward_fail_is_aborted_alone(engine, poison_after_steps):
    plain_forwards: list[int] = []
    hook = _forward_fails_past(engine, 10**9, plain_forwards)  # counts forwards, never fails
    try:
        expected, _ = _victim_tokens(engine, poison_after_steps=None)
    finally:
        hook.remove()
    forwards: list[int] = []
    hook = _forward_fails_past(engine, POISON_POSITION, forwards)
    try:
        tokens, failures = _victim_tokens(engine, poison_after_steps)
    finally:
        hook.remove()
    assert tokens == expected  # every victim, every token, as if the poison had never come
    assert set(failures) == {"poison"} and failures["poison"].field is None
    assert "secret" not in str(failures["poison"])
    engine.step()  # an empty step hands the worker the last finished ids
    assert engine.kv_manager.num_used_blocks == 0 and not engine.worker.states
    # The failing step is bisected (2 probes per halving of 7 requests) and rerun once without the poison.
    assert len(forwards) - len(plain_forwards) <= 2 * 3 + 1


def test_a_forward_failure_no_request_causes_still_fails_the_step(engine):
    from tokenmill.worker.step_isolation import MAX_ISOLATION_PROBES

    forwards: list[int] = []
    hook = _forward_fails_past(engine, 0, forwards)  # every step fails, whoever is in it
    try:
        for index in range(3):
            engine.add_request(f"r{index}", [5, 6, 7 + index], VICTIM)
        with pytest.raises(RuntimeError, match="kernel fault"):
            engine.step()
    finally:
        hook.remove()
        engine.abort_request([f"r{index}" for index in range(3)])
        engine.step()  # the worker drops the aborted requests' state
    assert 1 < len(forwards) <= 1 + MAX_ISOLATION_PROBES
