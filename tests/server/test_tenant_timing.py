"""The timing side channel is closed (CVE-2025-46570): with per-key isolation, a second API key sending a prompt
another key already sent waits as long as for a cold prompt, while the key that sent it gets its hit.

Time to first token is measured as the wall time of a max_tokens=1 request (prefill plus one sampled token).
Rounds interleave cold / other key / same key so machine load hits all three alike; medians of several rounds
and bounds far from the measured ratios (cold / hit is about 5-15x here) keep it stable on a busy 2-core box.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, start_server, stop_server
from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.server.app import build_app

PROMPT_LEN = 1500  # long enough that its prefill dwarfs the HTTP round trip
ROUNDS = 5
KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"


@pytest.fixture(scope="module")
def long_prompt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from tests.checkpoints import make_checkpoint

    model = make_checkpoint("llama", Path(tmp_path_factory.mktemp("tiny-long")), num_layers=2, hidden_size=128,
                            intermediate_size=384, max_position_embeddings=2048)
    config = EngineConfig(model=str(model), dtype="float32", max_model_len=PROMPT_LEN + 64, seed=0,
                          cache=CacheConfig(num_kv_blocks=(ROUNDS * 3 + 2) * (PROMPT_LEN // 16 + 2)),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=PROMPT_LEN + 64))
    engine = AsyncLLMEngine(LLMEngine(config))
    live = start_server(build_app(engine, MODEL, api_keys=[KEY_A, KEY_B]), engine)
    yield live
    stop_server(live)


def _ttft(live: LiveServer, prompt: list[int], key: str) -> tuple[float, int]:
    started = time.perf_counter()
    r = httpx.post(f"{live.base_url}/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    seconds = time.perf_counter() - started
    assert r.status_code == 200, r.text
    return seconds, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_another_keys_ttft_is_a_cold_prompts_while_the_same_key_hits(long_prompt_server):
    live = long_prompt_server
    _ttft(live, [7] * PROMPT_LEN, KEY_A)  # warm-up: first-call costs out of the measured rounds
    cold, other, same = [], [], []
    for round_index in range(ROUNDS):
        prompt = [(round_index * 31 + i * 7) % 500 + 5 for i in range(PROMPT_LEN)]
        seconds, hit = _ttft(live, prompt, KEY_A)
        assert hit == 0
        cold.append(seconds)
        seconds, hit = _ttft(live, prompt, KEY_B)
        assert hit == 0  # key A's prefix is invisible to key B
        other.append(seconds)
        seconds, hit = _ttft(live, prompt, KEY_A)
        assert hit == (PROMPT_LEN - 1) // 16 * 16
        same.append(seconds)
    cold_s, other_s, same_s = (statistics.median(v) for v in (cold, other, same))
    report = f"median TTFT: cold {cold_s:.3f}s, other key {other_s:.3f}s, same key {same_s:.3f}s"
    print(report)
    assert same_s < 0.5 * cold_s, report  # the key's own hit is clearly faster
    assert other_s > 0.6 * cold_s, report  # the other key learns nothing: it pays the whole prefill
