"""Hard reasoning budget on a checkpoint whose chat template opens <think>: the answer always comes."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL, WRAP_UP

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def _client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=60)


def _thinking_tokens(choice) -> int:
    """Generated tokens before the end tag, read from the per-token logprobs (exact, no re-tokenizing)."""
    tokens = [entry.token for entry in choice.logprobs.content]
    assert "</think>" in tokens, tokens
    return tokens.index("</think>")


@pytest.mark.parametrize("seed", [0, 1])
def test_budget_8_caps_reasoning_and_the_answer_follows(think_servers, seed):
    plain, _ = think_servers
    r = _client(plain).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=1.0, seed=seed, logprobs=True,
        extra_body={"thinking_token_budget": 8, "ignore_eos": True},
    )
    choice = r.choices[0]
    assert _thinking_tokens(choice) <= 8
    assert r.usage.completion_tokens_details.reasoning_tokens <= 8
    assert choice.message.content  # the forced end tag let the model answer
    assert choice.message.reasoning_content is not None or _thinking_tokens(choice) == 0


def test_streamed_reasoning_equals_non_streamed(think_servers):
    plain, _ = think_servers
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=1.0, seed=3,
                  extra_body={"thinking_token_budget": 8, "ignore_eos": True})
    client = _client(plain)
    full = client.chat.completions.create(**kwargs).choices[0].message
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == (full.reasoning_content or "", full.content)
    assert "<think>" not in content and "</think>" not in content


def test_server_default_budget_and_wrap_up_message(think_servers):
    _, wrapped = think_servers
    r = _client(wrapped).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=1.0, seed=5, logprobs=True,
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    wrap_tokens = len(plain_encode(wrapped, WRAP_UP))
    assert _thinking_tokens(choice) <= 4 + wrap_tokens
    assert choice.message.reasoning_content.endswith(WRAP_UP)
    assert choice.message.content


def test_without_a_budget_the_model_may_think_to_the_end(think_servers):
    plain, _ = think_servers
    r = _client(plain).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
    message = r.choices[0].message
    # The template opened <think>, so everything up to a (rare) end tag from the random model is reasoning.
    assert message.reasoning_content
    assert r.usage.completion_tokens_details.reasoning_tokens >= 1


def plain_encode(live, text: str) -> list[int]:
    return live.engine.tokenizer.encode(text, add_special_tokens=False)
