"""Prefix-cache isolation through the HTTP server: several API keys, --prefix-cache-scope, cache_salt.

Hits are read from usage.prompt_tokens_details.cached_tokens (the engine's own count of prompt tokens served
from the prefix cache). Each test sends prompts no other test sends, so the module's shared servers' caches
cannot leak hits between tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, make_engine, start_server, stop_server
from tokenmill.errors import InvalidRequestError
from tokenmill.input_checks import MAX_CACHE_SALT_CHARS
from tokenmill.server.app import build_app

KEY_A, KEY_B, KEY_C = "key-alpha", "key-bravo", "key-charlie"
PROMPT_LEN = 50  # three full blocks of 16 can hit; the last token is always computed
FULL_HIT = 48
_prompt_seeds = itertools.count(1)


def fresh_prompt() -> list[int]:
    """Token ids no other request of this module sends (the tiny vocabulary has 512 ids)."""
    seed = next(_prompt_seeds)
    return [seed % 500 + 5] + [(seed * 7 + i * 13) % 500 + 5 for i in range(PROMPT_LEN - 1)]


def complete(live: LiveServer, prompt: list[int], key: str | None = None, **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{live.base_url}/completions", headers=headers, timeout=60,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra})


def cached(live: LiveServer, prompt: list[int], key: str | None = None, **extra) -> int:
    r = complete(live, prompt, key, **extra)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def _serve(model_dir, **app_kwargs) -> LiveServer:
    engine = make_engine(model_dir)
    return start_server(build_app(engine, MODEL, **app_kwargs), engine)


@pytest.fixture(scope="module")
def per_key(model_dir) -> Iterator[LiveServer]:
    live = _serve(model_dir, api_keys=[KEY_A, KEY_B, KEY_C])  # per-key is the default scope
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def global_scope(model_dir) -> Iterator[LiveServer]:
    live = _serve(model_dir, api_keys=[KEY_A, KEY_B], prefix_cache_scope="global")
    yield live
    stop_server(live)


def test_two_keys_never_share_hits_and_each_key_gets_its_own(per_key):
    prompt = fresh_prompt()
    assert cached(per_key, prompt, KEY_A) == 0
    assert cached(per_key, prompt, KEY_B) == 0  # key A's blocks are not key B's
    assert cached(per_key, prompt, KEY_A) == FULL_HIT
    assert cached(per_key, prompt, KEY_B) == FULL_HIT
    assert cached(per_key, prompt, KEY_C) == 0


def test_cache_salt_narrows_within_a_key(per_key):
    prompt = fresh_prompt()
    assert cached(per_key, prompt, KEY_A, cache_salt="conversation-1") == 0
    assert cached(per_key, prompt, KEY_A, cache_salt="conversation-1") == FULL_HIT
    assert cached(per_key, prompt, KEY_A) == 0  # the key's own unsalted scope is another one
    assert cached(per_key, prompt, KEY_A, cache_salt="conversation-2") == 0
    assert cached(per_key, prompt, KEY_B, cache_salt="conversation-1") == 0  # a salt never crosses keys


def test_chat_completions_are_isolated_by_key(per_key):
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 6}]}

    def chat_cached(key: str) -> int:
        r = httpx.post(f"{per_key.base_url}/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert chat_cached(KEY_A) == 0
    assert chat_cached(KEY_B) == 0
    hit = chat_cached(KEY_A)
    assert hit >= 16 and hit % 16 == 0


def test_a_wrong_key_is_401_with_several_keys(per_key):
    prompt = fresh_prompt()
    for key in ("wrong", KEY_A + "x", KEY_A[:-1], KEY_B.upper()):
        r = complete(per_key, prompt, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert complete(per_key, prompt).status_code == 401  # no Authorization header
    for key in (KEY_A, KEY_B, KEY_C):
        assert complete(per_key, prompt, key).status_code == 200


def test_global_scope_hits_across_keys(global_scope):
    prompt = fresh_prompt()
    assert cached(global_scope, prompt, KEY_A) == 0
    assert cached(global_scope, prompt, KEY_B) == FULL_HIT
    # The body's salt is the only salt: it is shared by whoever sends it.
    assert cached(global_scope, prompt, KEY_A, cache_salt="shared") == 0
    assert cached(global_scope, prompt, KEY_B, cache_salt="shared") == FULL_HIT


def test_per_key_without_keys_behaves_as_global(server):
    prompt = fresh_prompt()
    assert cached(server, prompt) == 0
    assert cached(server, prompt) == FULL_HIT
    assert cached(server, prompt, cache_salt="narrow") == 0
    assert cached(server, prompt, cache_salt="narrow") == FULL_HIT


def test_per_request_scope_never_hits(model_dir):
    live = _serve(model_dir, api_keys=[KEY_A], prefix_cache_scope="per-request")
    try:
        prompt = fresh_prompt()
        for salt in (None, None, "same", "same"):
            extra = {} if salt is None else {"cache_salt": salt}
            assert cached(live, prompt, KEY_A, **extra) == 0
    finally:
        stop_server(live)


@pytest.mark.parametrize(("salt", "message"), [
    ("x" * (MAX_CACHE_SALT_CHARS + 1), f"1 to {MAX_CACHE_SALT_CHARS} characters, got {MAX_CACHE_SALT_CHARS + 1}"),
    ("", f"1 to {MAX_CACHE_SALT_CHARS} characters, got 0"),
    (7, "string"),
])
def test_a_bad_cache_salt_is_400_naming_the_field(per_key, salt, message):
    for endpoint, body in (("completions", {"prompt": [5, 6, 7]}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(f"{per_key.base_url}/{endpoint}", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60,
                       json={"model": MODEL, "max_tokens": 1, "cache_salt": salt, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "cache_salt" and message in error["message"], error


def test_build_app_refuses_bad_keys_and_scopes():
    with pytest.raises(ValueError, match="#2 is empty"):
        build_app(None, MODEL, api_keys=[KEY_A, " "])  # type: ignore[arg-type] - refused before the engine
    with pytest.raises(ValueError, match="prefix_cache_scope must be one of global, per-key, per-request"):
        build_app(None, MODEL, prefix_cache_scope="per-user")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not one string"):
        build_app(None, MODEL, api_keys=KEY_A)  # type: ignore[arg-type]


def test_the_llm_api_takes_cache_salt(offline_llm):
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0)
    prompt = fresh_prompt()

    def hit(**kwargs) -> int:
        return offline_llm.generate(kwargs.pop("prompt", prompt), params, **kwargs)[0].num_cached_tokens

    assert hit(cache_salt="a") == 0
    assert hit(cache_salt="b") == 0
    assert hit(cache_salt="a") == FULL_HIT
    assert hit(prompt={"prompt_token_ids": prompt, "cache_salt": "b"}) == FULL_HIT
    assert hit() == 0  # unsalted is its own scope
    longer = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = [offline_llm.generate(prompt, longer, cache_salt=s)[0] for s in ("a", "c")]
    assert [o.num_cached_tokens for o in outputs] == [FULL_HIT, 0]
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids  # a hit changes no output
    with pytest.raises(InvalidRequestError, match=f"cache_salt: must have 1 to {MAX_CACHE_SALT_CHARS}"):
        offline_llm.generate(prompt, params, cache_salt="")
