"""`tokenmill serve` as users run it: SIGTERM drains in-flight requests, then aborts, then exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tokenmill.tools.tiny_checkpoint import make_tiny_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(model: Path, drain_timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill", "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
         "--served-model-name", "tiny", "--drain-timeout", str(drain_timeout), "--max-model-len", "2048"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()
    proc.kill()
    raise AssertionError("server did not come up")


def stream_in_background(url: str, max_tokens: int, first_chunk: threading.Event) -> dict:
    result: dict = {"chunks": 0, "finish_reason": None, "done": False}

    def run() -> None:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        result["done"] = True
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        result["chunks"] += 1
                        result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
                        first_chunk.set()
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)
        first_chunk.set()

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", max_position_embeddings=2048)


def test_sigterm_lets_an_in_flight_request_finish(tiny):
    proc, url = start(tiny, drain_timeout=30)
    first = threading.Event()
    result = stream_in_background(url, max_tokens=200, first_chunk=first)
    assert first.wait(30)
    proc.send_signal(signal.SIGTERM)
    result["thread"].join(60)
    assert proc.wait(60) == 0
    assert result["finish_reason"] == "length" and result["done"]


def test_sigterm_aborts_what_does_not_finish_within_the_drain_timeout(tiny):
    proc, url = start(tiny, drain_timeout=0.5)
    first = threading.Event()
    result = stream_in_background(url, max_tokens=2000, first_chunk=first)
    assert first.wait(30)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - started < 15
    result["thread"].join(30)
    assert result["finish_reason"] == "abort" and result["done"], result  # a final event, not a cut connection
    log = proc.stdout.read().decode()
    assert "Traceback" not in log, log
