"""Offline LLM users get the thinking budget from a bare `thinking_token_budget`: the engine derives the ids."""

from __future__ import annotations

import json

import pytest

from tokenmill.config import CacheConfig, EngineConfig, ThinkingConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import ConfigError, InvalidRequestError
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

# The tiny tokenizer's ChatML, with a generation prompt that opens the thinking section.
THINK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
OPEN_PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
PLAIN_PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def llm(checkpoint_dir) -> LLM:
    return LLM(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=256, num_kv_blocks=128)


def _budget(budget: int, seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(thinking_token_budget=budget, max_tokens=16, temperature=1.0, seed=seed,
                          ignore_eos=True, **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_prompt_that_opened_thinking_is_cut_at_the_budget(llm, seed):
    end = llm.get_tokenizer().token_to_id("</think>")
    capped = llm.generate(OPEN_PROMPT, _budget(4, seed))[0].outputs[0].token_ids
    assert end in capped[:5], capped  # at most 4 thinking tokens, then the end tag (forced or the model's)
    free = llm.generate(OPEN_PROMPT, SamplingParams(max_tokens=16, temperature=1.0, seed=seed,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    if end not in free[:5]:  # the random model kept thinking: only the budget can have closed the section
        assert capped[:4] == free[:4] and capped[4] == end


def test_chat_template_that_opens_thinking_and_token_id_prompts_get_the_same_budget(llm):
    tokenizer = llm.get_tokenizer()
    end = tokenizer.token_to_id("</think>")
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = llm.chat(messages, _budget(3, 7), chat_template_kwargs={"chat_template": THINK_TEMPLATE})[0]
    assert end in chat.outputs[0].token_ids[:4]
    ids = tokenizer.render_chat(messages, chat_template=THINK_TEMPLATE).token_ids
    by_ids = llm.generate({"prompt_token_ids": ids}, _budget(3, 7))[0]
    assert by_ids.outputs[0].token_ids == chat.outputs[0].token_ids


def test_the_wrap_up_and_end_tag_come_from_the_engine_config(checkpoint_dir):
    wrap_up = "\nTime is up.\n"
    engine = LLMEngine(EngineConfig(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=256,
                                    cache=CacheConfig(num_kv_blocks=128), thinking=ThinkingConfig(wrap_up=wrap_up)))
    tokenizer = engine.tokenizer
    forced = tokenizer.encode(wrap_up, add_special_tokens=False) + [tokenizer.token_to_id("</think>")]
    assert engine.thinking_tokens.end_token_ids == forced
    engine.add_request("r", OPEN_PROMPT, _budget(0, 3))
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert final is not None
    assert final.outputs[0].token_ids[: len(forced)] == forced  # a zero budget closes at once, after the wrap-up


def test_a_prompt_without_a_thinking_section_is_not_forced(llm):
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    free = llm.generate(PLAIN_PROMPT, SamplingParams(**greedy))[0].outputs[0].token_ids
    assert llm.get_tokenizer().token_to_id("<think>") not in free  # the precondition of this check
    assert llm.generate(PLAIN_PROMPT, SamplingParams(thinking_token_budget=1, **greedy))[0].outputs[0].token_ids == free


def test_ids_of_the_request_s_own_win(llm):
    own = SamplingParams(thinking_token_budget=2, thinking_end_token_ids=[100], starts_in_thinking=True,
                         max_tokens=6, temperature=0.0, ignore_eos=True)
    assert llm.generate(PLAIN_PROMPT, own)[0].outputs[0].token_ids[2] == 100


def test_a_budget_without_a_tokenizer_names_the_field(checkpoint_dir, tmp_path):
    config = json.loads((checkpoint_dir("llama") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(model=str(tmp_path), load_format="random", dtype="float32", max_model_len=64, num_kv_blocks=16)
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([1, 2, 3], SamplingParams(thinking_token_budget=2))
    assert info.value.field == "thinking_token_budget" and "</think>" in str(info.value)
    assert llm.engine.num_unfinished_requests == 0  # validated before anything was queued


def test_empty_thinking_tags_are_refused():
    with pytest.raises(ConfigError, match="reasoning_end"):
        ThinkingConfig(end="")
