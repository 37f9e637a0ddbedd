"""The model pair shipped in models/: it loads everywhere, matches transformers, and answers to its name."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import hf_greedy
from tokenmill import LLM, SamplingParams
from tokenmill.cli import main
from tokenmill.model_catalog import SHIPPED_DRAFT as DEFAULT_DRAFT
from tokenmill.model_catalog import SHIPPED_MODEL as DEFAULT_MODEL
from tokenmill.model_catalog import resolve_models

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef main():\n    ", "class Stack:\n    def __init__(self):"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model=str(DEFAULT_MODEL), dtype="float32", max_model_len=1024)


def test_shipped_model_greedy_equals_transformers(llm: LLM) -> None:
    prompts = [llm.engine.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for output, reference in zip(outputs, hf_greedy(DEFAULT_MODEL, prompts, NEW_TOKENS)):
        assert output.outputs[0].token_ids == reference


def test_draft_model_speculation_keeps_greedy_output(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    plain = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    # Fixed draft length: the adaptive cost model may, on a slow machine, judge drafting not worth it and
    # propose nothing, which would leave the acceptance rate below unmeasured.
    spec = LLM(model=str(DEFAULT_MODEL), dtype="float32", max_model_len=1024, speculative_method="draft",
               draft_model=str(DEFAULT_DRAFT), num_speculative_tokens=4, speculative_adaptive=False)
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, params)] == plain
    assert spec.engine.stats()["spec_acceptance_rate"] > 0.3  # a distilled draft, not noise


def test_generate_with_the_shipped_model_prints_python(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", "tokenmill-py-13m", "--prompt", "def fibonacci(n):", "--max-tokens", "48"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def fibonacci(n):")
    completion = text[len("def fibonacci(n):"):]
    assert re.search(r"\n( {4})+\S", completion), "an indented line, in steps of four spaces"
    assert re.search(r"\b(return|if|for|while|self|def|None|in)\b", completion), "Python keywords"


def test_the_shipped_pair_fills_in_its_draft(tmp_path) -> None:
    assert resolve_models("tokenmill-py-13m", None, None) == (str(DEFAULT_MODEL), None)
    assert resolve_models("tokenmill-py-13m", "draft", None) == (str(DEFAULT_MODEL), str(DEFAULT_DRAFT))
    assert resolve_models(str(DEFAULT_MODEL), "draft", None) == (str(DEFAULT_MODEL), str(DEFAULT_DRAFT))
    assert resolve_models(str(tmp_path), "draft", None) == (str(tmp_path), None)  # no draft guessed for others
    assert resolve_models("tokenmill-py-13m", "draft", "mine") == (str(DEFAULT_MODEL), "mine")
