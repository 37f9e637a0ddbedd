"""The official openai client against a live server on a tiny random-weight checkpoint."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL
from tokenmill.sampling_params import SamplingParams

PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_n2_usage_counts_real_tokens(client, offline_llm):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=2, logprobs=0, seed=1,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    prompt_ids = offline_llm.get_tokenizer().encode(PROMPT)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert all(len(c.logprobs.tokens) == 6 and c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == len(prompt_ids) + 12


def test_list_of_prompts_and_token_id_prompts(client):
    r = client.completions.create(model=MODEL, prompt=[[5, 17, 42], [9, 10]], max_tokens=3, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12


def test_greedy_completion_and_chat_equal_the_offline_engine(client, offline_llm):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = offline_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.token_ids)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    expected_chat = offline_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))[0]
    assert chat.choices[0].message.content == expected_chat.outputs[0].text
    assert chat.usage.prompt_tokens == len(expected_chat.prompt_token_ids)


def test_seed_reproducible_and_streamed_text_equals_non_streamed(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=1234, n=2)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    other = client.completions.create(**{**kwargs, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    texts = {0: "", 1: ""}
    finish = {}
    usage = None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert [texts[0], texts[1]] == [c.text for c in a.choices]
    assert finish == {c.index: c.finish_reason for c in a.choices}
    assert usage is not None and usage.completion_tokens == a.usage.completion_tokens


def test_chat_stream_equals_non_streamed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.8, seed=7, n=2)
    full = client.chat.completions.create(**kwargs)
    content = {0: "", 1: ""}
    roles = set()
    usage = None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            roles.add(choice.delta.role)
            content[choice.index] += choice.delta.content or ""
    assert [content[0], content[1]] == [c.message.content for c in full.choices]
    assert "assistant" in roles
    assert usage.completion_tokens == full.usage.completion_tokens and usage.prompt_tokens == full.usage.prompt_tokens


def test_logprobs_shapes(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    # Greedy: the chosen token is the most likely one, so its logprob is the best of the top ones.
    assert all(1 <= len(top) <= 3 and max(top.values()) == pytest.approx(v, abs=1e-4)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True,
                                          top_logprobs=2, temperature=0, extra_body={"ignore_eos": True})
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens == 4
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_echo_returns_prompt_then_completion(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True, temperature=0)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text


def test_stop_string_cuts_the_text(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) >= 4
    stop = base[2:4]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[: base.find(stop)] and r.choices[0].finish_reason == "stop"


def test_default_max_tokens_fills_the_context(client, server):
    from tests.server.conftest import MAX_MODEL_LEN

    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True},
                                       temperature=0)
    assert r.usage.total_tokens == MAX_MODEL_LEN and r.choices[0].finish_reason == "length"
