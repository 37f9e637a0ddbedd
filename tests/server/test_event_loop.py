"""The event loop never waits on one request's heavy work: /health answers within 100 ms while large prompts
and a heavy chat template are being refused, and each of those gets its 400.

The clients are curl processes, so only the server's own work is measured. The machines these tests share are
loaded (2 cores, 7 test runs at once): a sentinel process that only sleeps 1 ms at a time measures how long the
OS keeps a waking process waiting meanwhile, and that wait is added to the bound: every probe must make 100 ms.
Large bodies are decoded off the loop (server/json_body.py), so no loop callback holds it for more than a few
milliseconds per body (see docs/security.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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


# Sleeps 1 ms at a time until stdin closes, then prints the longest it woke late: the OS's scheduling delay.
_SENTINEL = ("import sys, threading, time\nworst = 0.0\ndone = threading.Event()\n"
             "threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()\n"
             "while not done.is_set():\n    start = time.perf_counter()\n    time.sleep(0.001)\n"
             "    worst = max(worst, time.perf_counter() - start - 0.001)\nprint(worst)\n")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl to time /health from outside the process")
def _post_from_curl(url: str, body_file: Path) -> subprocess.Popen:
    """POST a body from a curl process: the clients must not share the server's process (and its interpreter
    lock), as real clients do not."""
    return subprocess.Popen(["curl", "-s", "-w", "\n%{http_code}", "-H", "content-type: application/json",
                             "--data-binary", f"@{body_file}", url], stdout=subprocess.PIPE, text=True)


def _answer(process: subprocess.Popen) -> tuple[int, dict]:
    output = process.communicate(timeout=120)[0]
    body, status = output.rsplit("\n", 1)
    return int(status), json.loads(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl to send and time requests from outside")
def test_health_answers_fast_while_heavy_requests_are_refused(trusting_server, tmp_path):
    # The heavy requests and the probes all come from curl processes, so what is measured is the server's work.
    prompt, template = tmp_path / "prompt.json", tmp_path / "template.json"
    prompt.write_text(json.dumps({"model": MODEL, "prompt": "ab " * (PROMPT_BYTES // 3), "max_tokens": 2}))
    template.write_text(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                    "chat_template_kwargs": {"chat_template": HEAVY_TEMPLATE}}))
    sentinel = subprocess.Popen([sys.executable, "-c", _SENTINEL], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
    heavy = [_post_from_curl(f"{trusting_server.base_url}/completions", prompt) for _ in range(4)]
    heavy.append(_post_from_curl(f"{trusting_server.base_url}/chat/completions", template))
    latencies = []
    while any(process.poll() is None for process in heavy):
        latencies.append(_health_seconds(trusting_server.root))
        time.sleep(0.02)
    responses = [_answer(process) for process in heavy]
    os_delay = float(sentinel.communicate("", timeout=30)[0])
    assert len(latencies) >= 3, "the heavy requests finished before /health could be measured beside them"
    ranked = sorted(latencies)
    assert ranked[-1] < 0.1 + os_delay, (
        f"the OS kept a sleeping process waiting {os_delay * 1000:.0f} ms at worst meanwhile", ranked[-5:])
    for status, answer in responses[:4]:
        assert status == 400 and answer["error"]["param"] == "prompt", answer
        assert "bytes" in answer["error"]["message"]
    status, answer = responses[4]
    template_error = answer["error"]
    assert status == 400 and template_error["param"] == "chat_template", template_error
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
