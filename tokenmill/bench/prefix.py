"""`tokenmill bench prefix`: the prefix-reuse recipe (BENCHMARKS.md 4) for the KV tiers.

Conversations share a long system prompt and each has its own long history; the device pool holds about one
of them, so by the time a conversation returns its blocks were evicted. The time to first token of the
returning turn is measured with the blocks recomputed (no tiers), loaded from the host tier and loaded from
the disk tier; then a new engine on the same disk folder (a restart) against a cold one, on the next turn.
Each figure is the median over the conversations; one request runs at a time, so TTFT is that request's own.
"""

from __future__ import annotations

import gc
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.engine.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams

EngineFactory = Callable[[dict[str, Any]], LLMEngine]  # EngineArgs overrides -> a fresh engine
MODES = ("recompute", "host", "disk")


@dataclass
class Workload:
    system: list[int]
    histories: list[list[int]]  # per conversation, after the system prompt
    follow_ups: list[list[int]]  # the user's next turn
    next_turns: list[list[int]]  # the turn after it (asked after the restart)


@dataclass
class PrefixResult:
    system_len: int
    history_len: int
    conversations: int
    ttft_s: dict[str, list[float]] = field(default_factory=dict)  # mode -> per returning conversation
    cached_tokens: dict[str, list[int]] = field(default_factory=dict)
    median_ttft_s: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)


def make_workload(vocab_size: int, system_len: int, history_len: int, conversations: int, follow_up_len: int,
                  seed: int = 0) -> Workload:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, vocab_size) for _ in range(n)]  # clear of the usual special ids at the bottom

    return Workload(tokens(system_len), [tokens(history_len) for _ in range(conversations)],
                    [tokens(follow_up_len) for _ in range(conversations)],
                    [tokens(follow_up_len) for _ in range(conversations)])


def run_alone(engine: LLMEngine, request_id: str, token_ids: list[int],
              max_tokens: int = 1) -> tuple[float, list[int], int]:
    """Run one request alone to its end: (seconds, its tokens, its prefix hit in tokens). With max_tokens=1 the
    seconds are its time to first token."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind="final_only")
    start = time.perf_counter()
    engine.add_request(request_id, {"prompt_token_ids": token_ids}, params)
    result: list[int] = []
    cached = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            result, cached = list(output.outputs[0].token_ids), output.num_cached_tokens
    return time.perf_counter() - start, result, cached


def run_prefix(build: EngineFactory, workload: Workload, output_len: int, host_bytes: int, disk_bytes: int,
               disk_path: str | None = None) -> PrefixResult:
    """Every mode on a fresh engine; the disk tier lives in a new folder (under `disk_path` when given), so
    no earlier run's blocks take part."""
    result = PrefixResult(len(workload.system), len(workload.histories[0]), len(workload.histories))
    if disk_path is not None:
        Path(disk_path).mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="tokenmill-prefix-", dir=disk_path)
    tiers = {"recompute": {}, "host": {"kv_host_bytes": host_bytes},
             "disk": {"kv_disk_path": folder, "kv_disk_bytes": disk_bytes}}
    returning: list[list[int]] = []
    for mode in MODES:
        engine = build(tiers[mode])
        run_alone(engine, f"{mode}-warm-up", workload.follow_ups[0][:8])
        turns = []
        for i, history in enumerate(workload.histories):  # turn 1 of every conversation fills and evicts the pool
            _, output, _ = run_alone(engine, f"{mode}-c{i}-t1", workload.system + history, output_len)
            turns.append(workload.system + history + output + workload.follow_ups[i])
        returning = turns
        _measure(engine, mode, turns, result)
        _close(engine)
    next_turns = [turn + workload.next_turns[i] for i, turn in enumerate(returning)]
    for mode, overrides in (("restart_disk", tiers["disk"]), ("cold_start", {})):
        engine = build(overrides)
        run_alone(engine, f"{mode}-warm-up", workload.follow_ups[0][:8])
        _measure(engine, mode, next_turns, result)
        _close(engine)
    result.median_ttft_s = {mode: statistics.median(times) for mode, times in result.ttft_s.items()}
    median = result.median_ttft_s
    result.ratios = {"recompute / host": median["recompute"] / median["host"],
                     "recompute / disk": median["recompute"] / median["disk"],
                     "cold start / restart (disk)": median["cold_start"] / median["restart_disk"]}
    return result


def _measure(engine: LLMEngine, mode: str, prompts: list[list[int]], result: PrefixResult) -> None:
    if engine.kv_tiers is not None:
        engine.flush_kv_tiers()  # what was evicted has reached its tier: the figure is a load, not a race
    times, cached = [], []
    for i, prompt in enumerate(prompts):
        seconds, _, hit = run_alone(engine, f"{mode}-c{i}-back", prompt)
        times.append(seconds)
        cached.append(hit)
        if engine.kv_tiers is not None:
            engine.flush_kv_tiers()
    result.ttft_s[mode], result.cached_tokens[mode] = times, cached


def _close(engine: LLMEngine) -> None:
    """A planned shutdown: the disk tier keeps what the pool and host tier held (what a server's shutdown does)."""
    if engine.kv_tiers is not None:
        engine.persist_kv_cache()
        engine.kv_tiers.close()
    del engine
    gc.collect()


def prefix_rows(result: PrefixResult) -> list[tuple[str, str]]:
    rows = [("conversations", str(result.conversations)),
            ("system / history tokens", f"{result.system_len} / {result.history_len}")]
    for mode, median in result.median_ttft_s.items():
        hit = statistics.median(result.cached_tokens[mode])
        rows.append((f"ttft {mode}", f"{median * 1e3:,.1f} ms (median; prefix hit {hit:,.0f} tokens)"))
    rows += [(name, f"{ratio:.2f}x") for name, ratio in result.ratios.items()]
    return rows
