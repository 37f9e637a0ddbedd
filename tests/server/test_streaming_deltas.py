"""The server streams from delta outputs: the chunks add up to the non-streamed response, usage included."""

from __future__ import annotations

from collections import defaultdict

import openai
import pytest

from tests.server.conftest import MODEL

PROMPTS = ["def fibonacci(n):", "Once upon a time"]
MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _stop_string(client: openai.OpenAI) -> str:
    text = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=1.0, seed=5,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(text) >= 6
    return text[3:6]


def test_completion_chunks_add_up_with_n_prompts_logprobs_and_stops(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS, max_tokens=16, temperature=1.0, seed=5, n=2, logprobs=2,
                  stop=[_stop_string(client)], extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert any(c.finish_reason == "stop" for c in full.choices) and len(full.choices) == 4
    text: dict[int, str] = defaultdict(str)
    tokens: dict[int, list] = defaultdict(list)
    token_logprobs: dict[int, list] = defaultdict(list)
    top_logprobs: dict[int, list] = defaultdict(list)
    finish: dict[int, list] = defaultdict(list)
    usage = None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text[choice.index] += choice.text
            if choice.logprobs is not None:
                tokens[choice.index] += choice.logprobs.tokens
                token_logprobs[choice.index] += choice.logprobs.token_logprobs
                top_logprobs[choice.index] += choice.logprobs.top_logprobs
            if choice.finish_reason is not None:
                finish[choice.index].append(choice.finish_reason)
    for choice in full.choices:
        i = choice.index
        assert text[i] == choice.text
        assert finish[i] == [choice.finish_reason]  # each choice finishes exactly once
        assert tokens[i] == choice.logprobs.tokens
        assert token_logprobs[i] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
        assert [sorted(t) for t in top_logprobs[i]] == [sorted(t) for t in choice.logprobs.top_logprobs]
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)


def test_streamed_echo_starts_each_choice_with_its_prompt(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS, max_tokens=5, temperature=0, n=2, echo=True)
    full = client.completions.create(**kwargs)
    text: dict[int, str] = defaultdict(str)
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text[choice.index] += choice.text
    assert {c.index: c.text for c in full.choices} == dict(text)
    assert all(text[i].startswith(PROMPTS[i // 2]) for i in range(4))


def test_chat_chunks_add_up_with_n_logprobs_and_stops(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=9, n=2, logprobs=True,
                  top_logprobs=2, stop=[_stop_string(client)], extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    content: dict[int, str] = defaultdict(str)
    entries: dict[int, list] = defaultdict(list)
    finish: dict[int, list] = defaultdict(list)
    usage = None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None:
                entries[choice.index] += choice.logprobs.content
            if choice.finish_reason is not None:
                finish[choice.index].append(choice.finish_reason)
    for choice in full.choices:
        i = choice.index
        assert content[i] == choice.message.content
        assert finish[i] == [choice.finish_reason]
        assert [e.token for e in entries[i]] == [e.token for e in choice.logprobs.content]
        assert [e.logprob for e in entries[i]] == pytest.approx([e.logprob for e in choice.logprobs.content], abs=1e-5)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)


def test_streamed_reasoning_usage_equals_non_streamed(think_servers):
    plain, _ = think_servers
    client = openai.OpenAI(base_url=plain.base_url, api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=1.0, seed=3, n=2,
                  extra_body={"thinking_token_budget": 6, "ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    reasoning: dict[int, str] = defaultdict(str)
    content: dict[int, str] = defaultdict(str)
    usage = None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            reasoning[choice.index] += getattr(choice.delta, "reasoning_content", None) or ""
            content[choice.index] += choice.delta.content or ""
    for choice in full.choices:
        assert reasoning[choice.index] == (choice.message.reasoning_content or "")
        assert content[choice.index] == (choice.message.content or "")
    expected = full.usage.completion_tokens_details.reasoning_tokens
    assert expected > 0 and usage.completion_tokens_details.reasoning_tokens == expected
    assert usage.completion_tokens == full.usage.completion_tokens
