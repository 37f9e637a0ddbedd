"""Hostile values a client can send: each is a 400 naming the field and the limit, and the server keeps serving.

Bodies are sent as raw JSON text so that values json.dumps would refuse (Infinity, NaN, lone surrogates,
absurd nesting) reach the server exactly as a hostile client would write them.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import MODEL

COMPLETION = '{"model": "%s", "prompt": "Hello", "max_tokens": 2, %%s}' % MODEL
CHAT = '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, %%s}' % MODEL
DEEP_SCHEMA = '{"type": "object", "properties": {"a": ' * 200 + '{"type": "string"}' + "}}" * 200

CASES = [
    (COMPLETION, '"top_k": 9223372036854775808', "top_k", "<="),
    (COMPLETION, '"top_k": 513', "top_k", "512"),
    (COMPLETION, '"top_k": -5', "top_k", "-1"),
    (COMPLETION, '"temperature": 1e999', "temperature", "finite"),
    (COMPLETION, '"temperature": NaN', "temperature", "finite"),
    (COMPLETION, '"repetition_penalty": Infinity', "repetition_penalty", "finite"),
    (COMPLETION, '"min_p": -Infinity', "min_p", "finite"),
    (COMPLETION, '"top_p": NaN', "top_p", "finite"),
    (COMPLETION, '"prompt": "a\\ud800b"', "prompt", "surrogate"),
    (COMPLETION, '"stop": ["\\udfff"]', "stop", "surrogate"),
    (CHAT, '"messages": [{"role": "user", "content": "x\\ud83d"}]', "messages[0].content", "surrogate"),
    (CHAT, '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": %s}}' % DEEP_SCHEMA,
     "response_format", "deep"),
]


@pytest.mark.parametrize(("template", "field_json", "param", "mentions"), CASES)
def test_hostile_values_are_400_naming_the_field(server, template, field_json, param, mentions):
    body = template % field_json
    r = httpx.post(f"{server.base_url}/{'chat/completions' if 'messages' in template else 'completions'}",
                   content=body.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error
    assert mentions in error["message"], error


def test_a_body_nested_past_the_limit_is_400(server):
    body = '{"model": "%s", "prompt": "Hi", "max_tokens": 2, "extra": %s}' % (MODEL, "[" * 50000 + "]" * 50000)
    r = httpx.post(f"{server.base_url}/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert "nest" in r.json()["error"]["message"]


def test_the_server_still_serves_after_hostile_values(server):
    r = httpx.post(f"{server.base_url}/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2,
                                                            "top_k": -1}, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.text)["choices"][0]["finish_reason"] in ("length", "stop")
