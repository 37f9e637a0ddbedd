"""Bad input gets a clear error naming the field and the limit, and the engine goes on serving."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import make_prompts
from tokenmill import LLM, ConfigError, InvalidRequestError, ModelLoadError, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoint_dir) -> LLM:
    return LLM(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=128)


@pytest.mark.parametrize(
    ("kwargs", "field", "limit"),
    [
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"temperature": -0.5}, "temperature", ">= 0"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"min_p": 2.0}, "min_p", "[0, 1]"),
        ({"n": 0}, "n", ">= 1"),
        ({"logprobs": 50}, "logprobs", "<= 20"),
        ({"presence_penalty": 3.0}, "presence_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ],
)
def test_invalid_sampling_values_name_the_field_and_limit(kwargs, field, limit):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert field in str(info.value) and limit in str(info.value)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate({"prompt_token_ids": make_prompts(lengths=[200])[0]}, GREEDY)
    message = str(info.value)
    assert info.value.field == "prompt" and "200" in message and "max_model_len is 128" in message


def test_out_of_vocabulary_token_ids(llm):
    with pytest.raises(InvalidRequestError, match=r"prompt_token_ids.*\[0, 512\)"):
        llm.generate({"prompt_token_ids": [1, 2, 99999]}, GREEDY)


def test_empty_prompt(llm):
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate({"prompt_token_ids": []}, GREEDY)


LONE_SURROGATE_CASES = [
    (lambda llm: llm.generate(["abc\ud800"], GREEDY), "prompt"),
    (lambda llm: llm.generate({"prompt": "\udc00"}, GREEDY), "prompt"),
    (lambda llm: list(llm.stream("x\ud800", GREEDY)), "prompt"),
    (lambda llm: llm.chat([{"role": "user", "content": "hi \ud800"}], GREEDY), "messages[0].content"),
    (lambda llm: llm.chat([[{"role": "user", "content": "ok"}, {"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}]], GREEDY), "messages[1].content[0].text"),
    (lambda llm: llm.chat([{"role": "user", "content": "hi"}], GREEDY, chat_template_kwargs={"name": "\ud800"}),
     "chat_template_kwargs.name"),
    (lambda llm: SamplingParams(stop=["\ud800"]), "stop"),
]


@pytest.mark.parametrize(("call", "field"), LONE_SURROGATE_CASES,
                         ids=["generate", "dict prompt", "stream", "chat", "content part", "template kwargs", "stop"])
def test_a_lone_surrogate_is_an_invalid_request_naming_the_field(llm, call, field):
    """The same rule and words as the server's 400 (tokenmill.input_checks), not a TypeError from the tokenizer."""
    with pytest.raises(InvalidRequestError) as info:
        call(llm)
    assert info.value.field == field and "lone UTF-16 surrogate" in str(info.value)
    assert llm.generate(["abc"], GREEDY)[0].outputs[0].token_ids  # and nothing was left queued


def test_engine_keeps_serving_other_requests_after_bad_input(llm):
    engine = llm.engine
    good = {"prompt_token_ids": make_prompts(lengths=[10], seed=1)[0]}
    expected = llm.generate(good, GREEDY)[0].outputs[0].token_ids
    engine.add_request("good", good, GREEDY)
    engine.step()
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", {"prompt_token_ids": make_prompts(lengths=[300])[0]}, GREEDY)
    with pytest.raises(InvalidRequestError):
        engine.add_request("good", good, GREEDY)  # duplicate id
    finished = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished = output
    assert finished is not None and finished.request_id == "good"
    assert finished.outputs[0].token_ids == expected
    # A batch with one bad prompt is rejected whole, queues nothing, and the next call works.
    with pytest.raises(InvalidRequestError):
        llm.generate([good, {"prompt_token_ids": [-1]}], GREEDY)
    assert not engine.has_unfinished_requests()
    assert llm.generate(good, GREEDY)[0].outputs[0].token_ids == expected


def test_nonexistent_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        LLM(model=str(missing))


def test_unsupported_architecture(checkpoint_dir, tmp_path):
    import shutil

    path = tmp_path / "weird"
    shutil.copytree(checkpoint_dir("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="GPTNeoXForCausalLM") as info:
        LLM(model=str(path))
    assert "LlamaForCausalLM" in str(info.value)


def test_max_model_len_beyond_the_model(checkpoint_dir):
    limit = r"^max_model_len: 10000000 exceeds the model's max_position_embeddings \(\d+\)$"
    with pytest.raises(ConfigError, match=limit) as info:
        LLM(model=str(checkpoint_dir("llama")), max_model_len=10**7)
    assert info.value.setting == "max_model_len"


def test_pool_smaller_than_the_context_is_a_clear_error(checkpoint_dir):
    with pytest.raises(ConfigError, match="lower max_model_len") as info:
        LLM(model=str(checkpoint_dir("llama")), max_model_len=512, num_kv_blocks=4)
    assert info.value.setting == "max_model_len"


def test_draft_model_with_another_tokenizer_is_a_config_error(checkpoint_dir, tmp_path):
    import shutil

    target = checkpoint_dir("llama")
    draft = tmp_path / "draft"
    shutil.copytree(target, draft)
    tokenizer = json.loads((draft / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, different ids
    (draft / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match="the draft must share the tokenizer") as info:
        LLM(model=str(target), speculative_method="draft", draft_model=str(draft))
    assert info.value.setting == "draft_model"


def test_stop_token_ids_past_the_vocabulary_are_refused(llm):
    """min_tokens masks stop ids in the logits: an id past the vocabulary failed the whole step (a 500)."""
    params = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[15336842704880450])
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(["abc"], params)
    assert info.value.field == "stop_token_ids" and "<= 511" in str(info.value)
