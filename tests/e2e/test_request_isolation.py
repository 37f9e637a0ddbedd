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
    from tokenmill.structured.params import StructuredOutputParams

    recursive = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                 "required": ["next"]}}, "$ref": "#/$defs/n"}
    finished, failures = _run(engine, SamplingParams(max_tokens=12, structured_outputs=StructuredOutputParams(
        json=recursive, source="tools")))
    _assert_only_the_poison_failed(finished, failures)
    assert failures["poison"].field == "tools"
