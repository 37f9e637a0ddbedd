"""64 concurrent streaming clients, a quarter of which hang up midway: the rest finish, no KV block leaks."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx

from tests.server.conftest import MODEL

NUM_CLIENTS = 64


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{name}\{{[^}}]*{labels}[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def _client(http: httpx.AsyncClient, url: str, index: int, disconnect: bool) -> dict:
    body = {"model": MODEL, "prompt": f"Request {index}: def add(a, b):", "stream": True, "temperature": 1.0,
            "seed": index, "max_tokens": 200 if disconnect else 8, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    text, finish, usage, done, events = "", None, None, False, 0
    async with http.stream("POST", f"{url}/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            assert "error" not in event, event
            events += 1
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                text += choice["text"]
                finish = choice["finish_reason"] or finish
            if disconnect and events >= 3:
                break  # leaving the context manager closes the connection midway
    return {"text": text, "finish": finish, "usage": usage, "done": done}


def test_many_streams_with_disconnects(server):
    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 4)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.gather(*[
                _client(http, server.base_url, i, disconnect=i % 4 == 0) for i in range(NUM_CLIENTS)
            ])

    before = httpx.get(f"{server.root}/metrics").text
    results = asyncio.run(main())
    for i, result in enumerate(results):
        if i % 4 == 0:
            assert not result["done"]
            continue
        assert result["done"] and result["finish"] == "length", result
        assert result["usage"]["completion_tokens"] == 8

    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(f"{server.root}/metrics").text
        idle = (_metric(metrics, "tokenmill_kv_blocks_used") == 0
                and _metric(metrics, "tokenmill_num_requests_running") == 0
                and _metric(metrics, "tokenmill_num_requests_waiting") == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, metrics
    # The hung-up requests were aborted, not run to their 200 tokens.
    aborted = (_metric(metrics, "tokenmill_request_success_total", 'finish_reason="abort"')
               - _metric(before, "tokenmill_request_success_total", 'finish_reason="abort"'))
    assert aborted == NUM_CLIENTS // 4
    assert _metric(metrics, "tokenmill_time_to_first_token_seconds_count") >= NUM_CLIENTS
    assert _metric(metrics, "tokenmill_generation_tokens_total") > 0
