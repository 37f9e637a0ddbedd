"""`tokenmill bench latency --structured compare`: the time per generated token that a JSON grammar adds.

Two separate bench runs differ by more than the effect (±15% run to run on a shared 2-core machine), so
constrained and unconstrained batches run on one engine, interleaved in pairs, alternating which goes
first, at the same temperature; the overhead is the median over pairs of the per-token time ratio."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from tokenmill.bench.prompts import PromptMaker
from tokenmill.bench.recipes import bench_params, default_temperature, time_one_batch
from tokenmill.engine.engine import LLMEngine


@dataclass
class StructuredOverheadResult:
    batch_size: int
    input_len: int
    output_len: int
    temperature: float
    pairs: int
    none_tok_per_s: float  # median over pairs, unconstrained
    json_tok_per_s: float  # median over pairs, every request constrained to BENCH_JSON_SCHEMA
    overhead_pct: float  # median over pairs of (json time per token / none time per token - 1), in percent
    pair_overheads_pct: list[float]


def run_structured_overhead(
    engine: LLMEngine, input_len: int = 128, output_len: int = 128, batch_size: int = 32, pairs: int = 5,
    seed: int = 0, temperature: float | None = None, prompts: PromptMaker | None = None,
) -> StructuredOverheadResult:
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    temperature = default_temperature("json", temperature)  # the same for both kinds of batch
    params = {mode: bench_params(output_len, mode, temperature) for mode in ("none", "json")}
    rng = random.Random(seed)
    for mode in ("none", "json"):  # warm-up: compiles the grammar, fills allocator caches
        time_one_batch(engine, rng, params[mode], batch_size, input_len, tag=f"so-warm-{mode}", prompts=prompts)
    rates: dict[str, list[float]] = {"none": [], "json": []}
    for pair in range(pairs):
        order = ("none", "json") if pair % 2 == 0 else ("json", "none")  # cancels drift within a pair
        for mode in order:
            tok_per_s, _, _ = time_one_batch(engine, rng, params[mode], batch_size, input_len, tag=f"so{pair}-{mode}",
                                          prompts=prompts)
            rates[mode].append(tok_per_s)
    overheads = [100.0 * (none / max(constrained, 1e-9) - 1.0) for none, constrained in zip(rates["none"], rates["json"])]
    return StructuredOverheadResult(
        batch_size=batch_size,
        input_len=input_len,
        output_len=output_len,
        temperature=temperature,
        pairs=pairs,
        none_tok_per_s=statistics.median(rates["none"]),
        json_tok_per_s=statistics.median(rates["json"]),
        overhead_pct=statistics.median(overheads),
        pair_overheads_pct=overheads,
    )
