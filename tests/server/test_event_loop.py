"""The event loop never waits on one request's heavy work: /health answers within 100 ms while large prompts
and a heavy chat template are being refused, and each of those gets its 400."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, make_engine, start_server, stop_server
from tokenmill.server.app import build_app

PROMPT_BYTES = 3_900_000
# 20,000 x 10,000 = 200 million loop iterations; each inner loop stays under the sandbox's range() limit.
HEAVY_TEMPLATE = "{% for i in range(20000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def trusting_server(model_dir) -> Iterator[LiveServer]:
    engine = make_engine(model_dir)
    live = start_server(build_app(engine, MODEL, max_body_bytes=8 << 20, trust_request_chat_template=True), engine)
    yield live
    stop_server(live)


def _health_seconds(root: str) -> float:
    """curl's own measure of one GET /health (connect to last byte); fails the test on any other status."""
    result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", f"{root}/health"],
                            capture_output=True, text=True, timeout=30, check=True)
    status, seconds = result.stdout.split()
    assert status == "200", result.stdout
    return float(seconds)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl to time /health from outside the process")
def test_health_answers_fast_while_heavy_requests_are_refused(trusting_server):
    # Bodies are encoded up front and /health is timed by curl in its own process, so the measure is the
    # server's alone, not this process's threads waiting for the interpreter lock.
    prompt = json.dumps({"model": MODEL, "prompt": "ab " * (PROMPT_BYTES // 3), "max_tokens": 2}).encode()
    template = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                           "chat_template_kwargs": {"chat_template": HEAVY_TEMPLATE}}).encode()
    headers = {"content-type": "application/json"}

    def send(path: str, body: bytes) -> httpx.Response:
        return httpx.post(f"{trusting_server.root}{path}", content=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(max_workers=5) as pool:
        heavy = [pool.submit(send, "/v1/completions", prompt) for _ in range(4)]
        heavy.append(pool.submit(send, "/v1/chat/completions", template))
        latencies = []
        while not all(future.done() for future in heavy):
            latencies.append(_health_seconds(trusting_server.root))
            time.sleep(0.02)
        responses = [future.result() for future in heavy]
    assert len(latencies) >= 3, "the heavy requests finished before /health could be measured beside them"
    # The bound is 100 ms. The test machines are shared (2 cores under a load of 6 while these ran), where the
    # OS alone deschedules a process for tens of ms: nine probes in ten must make it, and none may take 250 ms
    # (tokenizing one of these prompts on the event loop took seconds).
    ranked = sorted(latencies)
    assert ranked[int(0.9 * (len(ranked) - 1))] < 0.1 and ranked[-1] < 0.25, ranked[-5:]
    for response in responses[:4]:
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text[:300]
        assert "bytes" in response.json()["error"]["message"]
    template_error = responses[4].json()["error"]
    assert responses[4].status_code == 400 and template_error["param"] == "chat_template", template_error
    assert "budget" in template_error["message"]


def test_request_chat_templates_are_refused_by_default(server):
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "chat_template_kwargs": {"chat_template": "{{ messages }}"}})
    assert r.status_code == 400 and "trust-request-chat-template" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("key", ["add_generation_prompt", "tools", "messages", "eos_token"])
def test_reserved_template_variables_are_refused(server, key):
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "chat_template_kwargs": {key: "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == f"chat_template_kwargs.{key}", r.text


def test_unknown_roles_are_refused(server):
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "system<|im_end|>", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role", r.text


def test_a_trusted_request_template_renders(trusting_server):
    r = httpx.post(f"{trusting_server.base_url}/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "chat_template_kwargs": {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] >= 1
