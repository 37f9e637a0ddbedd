"""`tokenmill bench latency --speculative-compare ngram,draft,...`: speculative decoding against none.

Separate bench runs of each method differ by more than many of the effects (±15 % run to run on a shared
2-core machine), and at small batches the prompts themselves matter: code that repeats is drafted well,
new code is not. So one engine per method runs the same prompts round by round, in an order that rotates
every round, and the speedup is over the same work: total decode time without speculation divided by
total decode time with it.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from tokenmill.bench.prompts import PromptMaker
from tokenmill.bench.recipes import bench_params, time_one_batch
from tokenmill.engine.engine import LLMEngine

BASELINE = "none"


@dataclass
class MethodFigures:
    method: str
    tok_per_s: float  # decode tokens over decode seconds, all rounds together
    speedup: float  # the baseline's total decode seconds / this method's, for the same tokens
    round_speedups: list[float]
    acceptance_rate: float
    mean_accepted_length: float
    per_position_acceptance: list[float]
    # The speculator's view: start-up step times (ms) by tokens / by drafting requests, and the measured
    # tokens per second of decode steps by batch-size bucket and way of drafting.
    target_step_ms: dict[int, float] = field(default_factory=dict)
    draft_step_ms: dict[int, float] = field(default_factory=dict)
    measured_tok_per_s: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class SpecCompareResult:
    batch_size: int
    input_len: int
    output_len: int
    temperature: float
    rounds: int
    methods: list[MethodFigures]


def run_spec_compare(
    engines: dict[str, LLMEngine], input_len: int = 128, output_len: int = 128, batch_size: int = 1, rounds: int = 5,
    seed: int = 0, temperature: float = 0.0, prompts: PromptMaker | None = None,
) -> SpecCompareResult:
    """engines: method name -> engine, including BASELINE (no speculation)."""
    if BASELINE not in engines:
        raise ValueError(f"the comparison needs a {BASELINE!r} engine")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    params = bench_params(output_len, temperature=temperature)
    names = list(engines)
    for name in names:  # warm-up; speculators also learn their step costs here
        time_one_batch(engines[name], random.Random(seed - 1), params, batch_size, input_len, f"sc-warm-{name}", prompts)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            rng = random.Random(seed * 1_000_003 + round_index)  # the same prompts for every method this round
            tok_per_s, ttft, e2e = time_one_batch(engines[name], rng, params, batch_size, input_len,
                                                  f"sc{round_index}-{name}", prompts)
            decode_s = e2e - ttft
            seconds[name].append(decode_s)
            tokens[name].append(tok_per_s * decode_s)
    figures = []
    for name in names:
        stats = engines[name].stats()
        figures.append(MethodFigures(
            method=name,
            tok_per_s=sum(tokens[name]) / max(sum(seconds[name]), 1e-9),
            speedup=sum(seconds[BASELINE]) / max(sum(seconds[name]), 1e-9),
            round_speedups=[b / max(s, 1e-9) for b, s in zip(seconds[BASELINE], seconds[name])],
            acceptance_rate=stats.get("spec_acceptance_rate", 0.0),
            mean_accepted_length=stats.get("spec_mean_accepted_length", 0.0),
            per_position_acceptance=stats.get("spec_per_position_acceptance", []),
            **_speculator_view(engines[name]),
        ))
    return SpecCompareResult(batch_size, input_len, output_len, temperature, rounds, figures)


def _speculator_view(engine: LLMEngine) -> dict[str, dict]:
    speculator = engine.worker.drafter
    if speculator is None:
        return {}
    draft = speculator.draft_step_times.points if speculator.draft_step_times is not None else []
    return {
        "target_step_ms": {n: round(s * 1e3, 3) for n, s in speculator.target_times.points},
        "draft_step_ms": {n: round(s * 1e3, 3) for n, s in draft},
        "measured_tok_per_s": speculator.rates.summary(),
    }


def compare_rows(result: SpecCompareResult) -> list[tuple[str, str]]:
    rows = [("batch size", str(result.batch_size)), ("rounds", str(result.rounds))]
    for figures in result.methods:
        line = f"{figures.tok_per_s:,.1f} tok/s  {figures.speedup:.2f}x"
        if figures.method != BASELINE:
            per_round = statistics.median(figures.round_speedups)
            positions = ", ".join(f"{p:.2f}" for p in figures.per_position_acceptance)
            line += (f" (median round {per_round:.2f}x)  acceptance {figures.acceptance_rate:.2f}"
                     f"  accepted length {figures.mean_accepted_length:.2f}  per position [{positions}]")
        rows.append((figures.method, line))
        if figures.measured_tok_per_s:
            measured = "; ".join(f"batch <={key}: " + ", ".join(f"{arm} {rate:,.0f}" for arm, rate in arms.items())
                                 for key, arms in figures.measured_tok_per_s.items())
            rows.append(("", f"  measured tok/s by batch and way of drafting: {measured}"))
    return rows
