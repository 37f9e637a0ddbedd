"""The latency recipe times decode like llama-batched-bench's S_TG: only after every request has its first token."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

import pytest

from tokenmill.bench.recipes import bench_params, time_one_batch
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams


class StaggeredEngine:
    """Each step takes one second of a fake clock, prefills one waiting request (its first token) and gives
    every request already started one more token: prefill of late requests overlaps others' decode. Outputs
    are deltas."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.arch = SimpleNamespace(vocab_size=100)
        self.waiting: list[tuple[str, int]] = []
        self.running: dict[str, list[int]] = {}
        self.max_tokens: dict[str, int] = {}

    def add_request(self, request_id: str, prompt: dict[str, Any], params: SamplingParams) -> None:
        self.waiting.append((request_id, len(prompt["prompt_token_ids"])))
        self.max_tokens[request_id] = params.max_tokens

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        self.clock[0] += 1.0
        for tokens in self.running.values():
            tokens.append(7)
        if self.waiting:
            request_id, _ = self.waiting.pop(0)
            self.running[request_id] = [7]
        outputs = []
        for request_id, tokens in list(self.running.items()):
            done = len(tokens) == self.max_tokens[request_id]
            # Delta outputs, as bench_params asks for: the one token this step added.
            outputs.append(RequestOutput(request_id, None, [], [CompletionOutput(0, "", tokens[-1:])], finished=done))
            if done:
                del self.running[request_id]
        return outputs


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    return now


def test_decode_starts_after_the_last_request_gets_its_first_token(clock):
    engine = StaggeredEngine(clock)
    tok_per_s, ttft, e2e = time_one_batch(engine, random.Random(0), bench_params(5), 3, 4, tag="b")
    # Steps 1-3 prefill r0, r1, r2 (6 tokens by then); steps 4-7 produce the other 9 of 15 tokens.
    assert (ttft, e2e) == (3.0, 7.0)
    assert tok_per_s == pytest.approx(9 / 4)  # counting from the first token of any request would give 12 / 6


def test_batch_one_is_tokens_after_the_first_over_the_time_after_it(clock):
    engine = StaggeredEngine(clock)
    tok_per_s, ttft, e2e = time_one_batch(engine, random.Random(0), bench_params(5), 1, 4, tag="one")
    assert (tok_per_s, ttft, e2e) == (pytest.approx(4 / 4), 1.0, 5.0)
