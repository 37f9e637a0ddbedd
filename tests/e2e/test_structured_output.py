"""Structured output through the offline engine: every seed's output obeys its constraint and ends.

Random-weight checkpoints emit noise, so whenever an output parses, it is the token mask that made it
parse. The masks must stay on their own rows of a batch, survive preemption and speculative decoding
of the other rows, and a bad constraint is the caller's error, naming the field, never the engine's.
"""

from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.structured.params import StructuredOutputParams

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(importlib.util.find_spec("llguidance") is None,
                                 reason="needs llguidance (pip install 'tokenmill[test]')")]

SEEDS = range(50)
PROMPT = "Describe a pet as JSON:"
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 500},
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        # multipleOf bounds the digits too: without it a random model may write 300 of them.
        "weight": {"type": "number", "minimum": 0.5, "maximum": 20, "multipleOf": 0.25},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "email": {"type": "string", "maxLength": 10},
                "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                           "maxItems": 4},
                "vip": {"type": "boolean"},
            },
            "required": ["email", "scores"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "kind", "weight", "tags", "owner"],
    "additionalProperties": False,
}
PHONE = r"[0-9]{3}-[0-9]{4}"
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
CHOICES = ["yes", "no", "maybe so", "café ☕", 'say "hi"\n']
# Arithmetic without parentheses, so a regex describes the same language.
ARITH_GBNF = (
    "root ::= expr\n"
    'expr ::= term (("+" | "-") term){0,3}\n'
    'term ::= num ("*" num)?\n'
    "num ::= [1-9] [0-9]{0,2}\n"
)
_NUM = r"[1-9][0-9]{0,2}"
ARITH = re.compile(rf"{_NUM}(\*{_NUM})?([+-]{_NUM}(\*{_NUM})?){{0,3}}")
GREETING_LARK = 'start: greeting " " name "!"?\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,5}/\n'
GREETING = re.compile(r"(hello|hi) [A-Z][a-z]{1,5}!?")



def make_llm(path, **kw) -> LLM:
    return LLM(model=str(path), dtype="float32", max_model_len=512, num_kv_blocks=256, **kw)


@pytest.fixture(scope="module")
def llm(checkpoint_dir) -> LLM:
    return make_llm(checkpoint_dir("llama"))


def constrained(seed: int | None = None, max_tokens: int = 300, **option) -> SamplingParams:
    temperature = 0.0 if seed is None else 1.0
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputParams(**option))


def texts_and_reasons(outputs) -> list[tuple[str, str]]:
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]


def check_pet_schema_for_50_seeds(llm: LLM) -> None:
    outputs = llm.generate([PROMPT] * len(SEEDS), [constrained(seed, json=PET_SCHEMA) for seed in SEEDS])
    for seed, (text, reason) in enumerate(texts_and_reasons(outputs)):
        assert reason == "stop", (seed, reason, text)
        jsonschema.validate(json.loads(text), PET_SCHEMA)
    # Sampling, not one answer 50 times: the seeds give different objects.
    assert len({o.outputs[0].text for o in outputs}) > 40


def test_json_schema_holds_for_50_seeds_in_one_batch(llm):
    preemptions = llm.engine.stats()["num_preemptions"]
    check_pet_schema_for_50_seeds(llm)
    # 50 sequences of ~130 tokens need more than the 256 blocks: some were preempted and recomputed,
    # and their grammar state came through.
    assert llm.engine.stats()["num_preemptions"] > preemptions


def test_json_schema_holds_on_another_family(checkpoint_dir):
    check_pet_schema_for_50_seeds(make_llm(checkpoint_dir("qwen3")))


@pytest.mark.parametrize("pattern", [PHONE, DATE])
def test_regex_fullmatches_for_50_seeds(llm, pattern):
    outputs = llm.generate([PROMPT] * len(SEEDS), [constrained(seed, max_tokens=40, regex=pattern) for seed in SEEDS])
    for text, reason in texts_and_reasons(outputs):
        assert reason == "stop" and re.fullmatch(pattern, text), (reason, text)
    assert len({text for text, _ in texts_and_reasons(outputs)}) > 40


def test_choice_is_one_of_the_options_for_50_seeds(llm):
    outputs = llm.generate([PROMPT] * len(SEEDS), [constrained(seed, max_tokens=40, choice=CHOICES) for seed in SEEDS])
    seen = set()
    for text, reason in texts_and_reasons(outputs):
        assert reason == "stop" and text in CHOICES, (reason, text)
        seen.add(text)
    assert len(seen) >= 3  # the options are sampled, not always the first


def test_json_object_parses_to_a_dict(llm):
    """Any JSON object. A random model either closes it at once or rambles on in a string, so the
    generous max_tokens still cuts some off: only finished outputs must parse, and most must finish."""
    seeds = range(24)
    prompts = ["Hello, world!", "JSON"] * (len(seeds) // 2)
    outputs = llm.generate(prompts, [constrained(seed, max_tokens=400, json_object=True) for seed in seeds])
    finished = [text for text, reason in texts_and_reasons(outputs) if reason == "stop"]
    assert len(finished) >= 0.8 * len(seeds), texts_and_reasons(outputs)
    values = [json.loads(text) for text in finished]
    assert all(isinstance(value, dict) for value in values), finished
    assert any(values), finished  # not only "{}": keys and values were generated under the mask too


@pytest.mark.parametrize(("grammar", "language"), [(ARITH_GBNF, ARITH), (GREETING_LARK, GREETING)],
                         ids=["gbnf", "lark"])
def test_grammar_output_is_in_its_language(llm, grammar, language):
    seeds = range(30)
    outputs = llm.generate([PROMPT] * len(seeds), [constrained(seed, max_tokens=60, grammar=grammar) for seed in seeds])
    for text, reason in texts_and_reasons(outputs):
        assert reason == "stop" and language.fullmatch(text), (reason, text)
    assert len({text for text, _ in texts_and_reasons(outputs)}) > 10


def test_masks_stay_on_their_rows_in_a_mixed_batch(llm):
    """Free and constrained requests side by side give what each gives alone (greedy: exactly)."""
    free = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    batch = [
        ("Hello, world!", free),
        (PROMPT, constrained(json=PET_SCHEMA)),
        ("import torch", free),
        ("Call me at", constrained(regex=PHONE)),
        ("def fibonacci(n):", free),
        ("Well?", constrained(choice=CHOICES)),
        ("1+2", constrained(grammar=ARITH_GBNF)),
    ]
    together = llm.generate([p for p, _ in batch], [s for _, s in batch])
    for (prompt, params), output in zip(batch, together):
        alone = llm.generate([prompt], params)[0]
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids, prompt
    free_texts = [o.outputs[0].text for (_, s), o in zip(batch, together) if s is free]
    # A leaked mask would have forced JSON / digits onto the free rows.
    assert not any(re.fullmatch(PHONE, t) or t.lstrip().startswith("{") for t in free_texts), free_texts
    jsonschema.validate(json.loads(together[1].outputs[0].text), PET_SCHEMA)
    assert re.fullmatch(PHONE, together[3].outputs[0].text)
    assert together[5].outputs[0].text in CHOICES
    assert ARITH.fullmatch(together[6].outputs[0].text)


def test_speculative_decoding_leaves_structured_greedy_output_unchanged(llm, checkpoint_dir):
    # Repetitive free prompts, so n-gram drafts are proposed and verified in the same steps as the
    # constrained rows are masked.
    batch = [
        (PROMPT, constrained(json=PET_SCHEMA)),
        ([11, 12, 13, 14, 15] * 12, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)),
        ("Call me at", constrained(regex=PHONE)),
        ("a b c a b c a b c a b c", SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)),
        ("1+2", constrained(grammar=ARITH_GBNF)),
        ("Well?", constrained(choice=CHOICES)),
    ]
    prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p, _ in batch]
    params = [s for _, s in batch]
    plain = llm.generate(prompts, params)
    spec = make_llm(checkpoint_dir("llama"), speculative_method="ngram", num_speculative_tokens=4,
                    speculative_adaptive=False)
    speculative = spec.generate(prompts, params)
    for (prompt, _), a, b in zip(batch, plain, speculative):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, prompt
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert spec.engine.stats()["spec_num_draft_tokens"] > 0  # speculation did run alongside the masks
    jsonschema.validate(json.loads(speculative[0].outputs[0].text), PET_SCHEMA)
    assert re.fullmatch(PHONE, speculative[2].outputs[0].text)


BAD = [
    ({"json": {"type": "nope"}}, "response_format"),
    ({"json": '{"type": "object", '}, "response_format"),
    ({"json": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
               "required": ["a"]}}, "response_format"),
    ({"regex": "(ab"}, "guided_regex"),
    ({"regex": "a{5,2}"}, "guided_regex"),
    ({"choice": []}, "guided_choice"),
    ({"choice": ["a", 3]}, "guided_choice"),
    ({"grammar": "root ::= missing_rule"}, "guided_grammar"),
    ({"grammar": "start: undefined_name"}, "guided_grammar"),
    ({"grammar": "this is not a grammar"}, "guided_grammar"),
    ({"grammar": "   "}, "guided_grammar"),
]


@pytest.mark.parametrize(("option", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_constraint_names_its_field_and_the_engine_serves_on(llm, option, field):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([PROMPT], SamplingParams(max_tokens=8, structured_outputs=StructuredOutputParams(**option)))
    assert info.value.field == field, info.value
    assert not llm.engine.has_unfinished_requests()
    after = llm.generate([PROMPT], constrained(seed=1, max_tokens=40, regex=PHONE))[0].outputs[0]
    assert after.finish_reason == "stop" and re.fullmatch(PHONE, after.text)


def test_structured_params_need_exactly_one_option(llm):
    for params in (StructuredOutputParams(), StructuredOutputParams(regex="a", choice=["a"])):
        with pytest.raises(InvalidRequestError) as info:
            llm.generate([PROMPT], SamplingParams(max_tokens=4, structured_outputs=params))
        assert info.value.field == "structured_outputs"


def test_a_bad_constraint_later_in_a_batch_queues_nothing(llm):
    bad = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputParams(regex="(ab"))
    with pytest.raises(InvalidRequestError):
        llm.generate([PROMPT, PROMPT], [SamplingParams(max_tokens=5), bad])
    assert not llm.engine.has_unfinished_requests()
    outputs = llm.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(outputs) == 1 and len(outputs[0].outputs[0].token_ids) == 6
