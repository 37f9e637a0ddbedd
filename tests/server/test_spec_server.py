"""The server with speculative decoding: greedy completions unchanged, acceptance in /metrics."""

from __future__ import annotations

import re

import httpx

from tests.server.conftest import MAX_MODEL_LEN, MODEL, start_server, stop_server
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.server.app import build_app


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{name}\{{[^}}]*{labels}[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_speculative_server_matches_plain_output_and_reports_acceptance(model_dir, offline_llm):
    from tokenmill.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    llm = LLM(str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256, seed=0,
              speculative_method="ngram", speculative_adaptive=False)
    engine = AsyncLLMEngine(llm.engine)
    live = start_server(build_app(engine, MODEL), engine)
    try:
        prompt = "def fibonacci(n): def fibonacci(n): def fibonacci(n):"
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0.0, "ignore_eos": True}
        reply = httpx.post(f"{live.base_url}/completions", json=body, timeout=60).json()
        expected = offline_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        assert reply["choices"][0]["text"] == expected[0].outputs[0].text
        metrics = httpx.get(f"{live.root}/metrics").text
        drafted = _metric(metrics, "tokenmill_spec_decode_num_draft_tokens_total")
        accepted = _metric(metrics, "tokenmill_spec_decode_num_accepted_tokens_total")
        assert drafted > 0 and 0 <= accepted <= drafted
        assert _metric(metrics, "tokenmill_spec_decode_acceptance_rate") == accepted / drafted
        assert _metric(metrics, "tokenmill_spec_decode_per_position_acceptance", 'position="0"') >= 0
    finally:
        stop_server(live)
