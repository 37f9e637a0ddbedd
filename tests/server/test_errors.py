"""Every kind of bad input gets its status and an OpenAI-shaped error naming the field; the server survives."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MAX_BODY_BYTES, MAX_MODEL_LEN, MODEL

GOOD_COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

CASES = [
    ("completions", {"temperature": -1}, 400, "temperature", ">= 0"),
    ("completions", {"temperature": "hot"}, 400, "temperature", "number"),
    ("completions", {"top_p": 2}, 400, "top_p", "(0, 1]"),
    ("completions", {"n": 0}, 400, "n", ">= 1"),
    ("completions", {"max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("completions", {"logprobs": 50}, 400, "logprobs", "20"),
    ("completions", {"presence_penalty": 5}, 400, "presence_penalty", "[-2, 2]"),
    ("completions", {"thinking_token_budget": -1}, 400, "thinking_token_budget", ">= 0"),
    ("completions", {"prompt": [999999]}, 400, "prompt", "token ids"),
    ("completions", {"prompt": "hello " * (2 * MAX_MODEL_LEN)}, 400, "prompt", str(MAX_MODEL_LEN)),
    ("completions", {"prompt": None}, 400, "prompt", "prompt"),
    ("completions", {"model": "no-such-model"}, 404, "model", "no-such-model"),
    ("chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages", "messages"),
    ("chat/completions", {"top_logprobs": 50, "logprobs": True}, 400, "top_logprobs", "20"),
    ("chat/completions", {"max_completion_tokens": -3}, 400, "max_tokens", ">= 1"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * (2 * MAX_MODEL_LEN)}]}, 400, "messages",
     str(MAX_MODEL_LEN)),
]


@pytest.mark.parametrize(("endpoint", "override", "status", "param", "mentions"), CASES)
def test_bad_values_name_the_field_and_the_limit(server, endpoint, override, status, param, mentions):
    body = {**(GOOD_CHAT if endpoint.startswith("chat") else GOOD_COMPLETION), **override}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(f"{server.base_url}/{endpoint}", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] is not None and error["param"].startswith(param), error
    assert mentions in error["message"], error


def test_malformed_json_and_wrong_body_types(server):
    for content in (b'{"model": ', b"[1, 2]", b"not json"):
        r = httpx.post(f"{server.base_url}/completions", content=content,
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"], r.text


def test_body_over_the_limit_is_413(server):
    r = httpx.post(f"{server.base_url}/completions", json={**GOOD_COMPLETION, "prompt": "x" * (MAX_BODY_BYTES + 10)},
                   timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_a_good_request_after_the_bad_ones_succeeds(server):
    for endpoint, good in (("completions", GOOD_COMPLETION), ("chat/completions", GOOD_CHAT)):
        r = httpx.post(f"{server.base_url}/{endpoint}", json=good, timeout=30)
        assert r.status_code == 200, r.text
    assert httpx.get(f"{server.root}/health").status_code == 200


def test_api_key_is_required_when_set(guarded_server):
    url = f"{guarded_server.base_url}/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{guarded_server.root}/health").status_code == 200  # probes need no key


def test_full_waiting_queue_is_503(guarded_server):
    client = openai.OpenAI(base_url=guarded_server.base_url, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert info.value.status_code == 503 and "max-queue" in info.value.message
