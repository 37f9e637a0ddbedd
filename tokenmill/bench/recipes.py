"""The latency and throughput recipes of BENCHMARKS.md, run on one engine."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from tokenmill.bench.prompts import PromptMaker, random_prompts
from tokenmill.bench.roofline import Bandwidth, kv_bytes_per_sequence, measure_bandwidth, weight_bytes_per_step
from tokenmill.engine.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams


@dataclass
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    tok_per_s: float  # decode tok/s of the whole batch once every request has its first token (median run)
    ttft_s: float  # until every request of the batch has its first token
    e2e_s: float
    achieved_gb_per_s: float
    bytes_per_step: int  # weights (embedding: a row per token) + every sequence's KV at mid-output context
    bandwidth_gb_per_s: float
    bandwidth_kind: str  # "read" on CPU, "copy, read + write" on GPU
    ceiling_tok_per_s: float  # batch_size x bandwidth / bytes_per_step
    pct_of_ceiling: float
    runs_tok_per_s: list[float]


# Printed names for result fields where the field name is not what readers (and tests) look for.
ROW_NAMES = {"ceiling_tok_per_s": "ceiling tok/s", "pct_of_ceiling": "% of ceiling"}


# The JSON that `--structured json` asks for: open-ended (an array of records), so the grammar stays
# active for the whole run instead of finishing after a few tokens.
BENCH_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 16},
                               "score": {"type": "number"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
                "required": ["id", "name", "score", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}


def bench_params(max_tokens: int, structured: str = "none", temperature: float = 0.0) -> SamplingParams:
    """The benchmark's sampling parameters; `structured="json"` constrains output to BENCH_JSON_SCHEMA."""
    constraint = None
    if structured == "json":
        from tokenmill.structured.params import StructuredOutputParams

        constraint = StructuredOutputParams(json=BENCH_JSON_SCHEMA)
    # Deltas: each step's outputs cost O(new tokens), so output building never grows with the context.
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                          structured_outputs=constraint, output_kind="delta")


def default_temperature(structured: str, temperature: float | None) -> float:
    # Sampled at temperature 1 when constrained: greedy noise from a random model can close the JSON early.
    # Pass the same explicit temperature to both runs when comparing constrained with unconstrained decoding.
    if temperature is not None:
        return temperature
    return 1.0 if structured != "none" else 0.0


def time_one_batch(
    engine: LLMEngine, rng: random.Random, params: SamplingParams, batch_size: int, input_len: int, tag: str,
    prompts: PromptMaker | None = None,
) -> tuple[float, float, float]:
    """Run `batch_size` requests with fresh prompts to completion: (decode tok/s, TTFT s, end-to-end s).

    Decode is timed like llama-batched-bench's S_TG: from the end of the step after which every request has
    its first token, so no prefill is inside it; TTFT is the time until then (at batch 1, the request's TTFT).
    Fresh prompts every call (random ids unless `prompts` is given), so no call is helped by the prefix cache.
    Tokens are counted from delta outputs, as `bench_params` asks for."""
    make = prompts or random_prompts(engine.arch.vocab_size)
    for i in range(batch_size):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": make(rng, input_len)}, params)
    start = time.perf_counter()
    # Tokens per request, counted, not assumed: a grammar can end a constrained request before max_tokens.
    generated: dict[str, int] = {}
    all_started_at: float | None = None
    tokens_before_decode = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        for output in outputs:  # delta outputs: every token in them is new
            count = sum(len(c.token_ids) for c in output.outputs)
            generated[output.request_id] = generated.get(output.request_id, 0) + count
        if all_started_at is None and sum(1 for n in generated.values() if n > 0) == batch_size:
            all_started_at = time.perf_counter()
            tokens_before_decode = sum(generated.values())
    end = time.perf_counter()
    started = all_started_at if all_started_at is not None else end
    decode_tokens = sum(generated.values()) - tokens_before_decode
    return decode_tokens / max(end - started, 1e-9), started - start, end - start


def run_latency(
    engine: LLMEngine, input_len: int = 128, output_len: int = 256, batch_size: int = 1, runs: int = 3, seed: int = 0,
    structured: str = "none", temperature: float | None = None, prompts: PromptMaker | None = None,
    bandwidth: Bandwidth | None = None,
) -> LatencyResult:
    """Batch-`batch_size` decode (greedy unless `temperature`); one warm-up, then the median of `runs`.
    The ceiling divides by `bandwidth` when the caller measured it already (the device check), else by a
    fresh measurement."""
    rng = random.Random(seed)
    params = bench_params(output_len, structured, default_temperature(structured, temperature))
    samples: list[tuple[float, float, float]] = []
    for run in range(runs + 1):
        sample = time_one_batch(engine, rng, params, batch_size, input_len, tag=f"lat{run}", prompts=prompts)
        if run > 0:  # run 0 warms up
            samples.append(sample)
    tok_per_s = statistics.median(s[0] for s in samples)
    bytes_per_step = weight_bytes_per_step(engine.model, batch_size) + batch_size * kv_bytes_per_sequence(
        engine.model, input_len + output_len // 2, engine.dtype
    )
    bandwidth = bandwidth or measure_bandwidth(engine.device)
    ceiling = batch_size * bandwidth.bytes_per_s / bytes_per_step
    return LatencyResult(
        batch_size=batch_size,
        input_len=input_len,
        output_len=output_len,
        tok_per_s=tok_per_s,
        ttft_s=statistics.median(s[1] for s in samples),
        e2e_s=statistics.median(s[2] for s in samples),
        achieved_gb_per_s=bytes_per_step * tok_per_s / batch_size / 1e9,
        bytes_per_step=bytes_per_step,
        bandwidth_gb_per_s=bandwidth.bytes_per_s / 1e9,
        bandwidth_kind=bandwidth.kind,
        ceiling_tok_per_s=ceiling,
        pct_of_ceiling=100.0 * tok_per_s / ceiling,
        runs_tok_per_s=[s[0] for s in samples],
    )


@dataclass
class ThroughputResult:
    num_requests: int
    wall_s: float
    output_tokens: int
    total_tokens: int
    output_tok_per_s: float
    total_tok_per_s: float
    peak_kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int


def run_throughput(
    engine: LLMEngine, num_requests: int = 256, min_len: int = 100, max_len: int = 1024, seed: int = 0,
    structured: str = "none", temperature: float | None = None, prompts: PromptMaker | None = None,
) -> ThroughputResult:
    """All requests at once; prompt and output lengths each uniform in [min_len, max_len]."""
    rng = random.Random(seed)
    make = prompts or random_prompts(engine.arch.vocab_size)
    limit = engine.max_model_len
    total_prompt = total_output = 0
    for i in range(num_requests):
        prompt_len = min(rng.randint(min_len, max_len), limit - 1)
        output_len = max(1, min(rng.randint(min_len, max_len), limit - prompt_len))
        params = bench_params(output_len, structured, default_temperature(structured, temperature))
        engine.add_request(f"tp{i}", {"prompt_token_ids": make(rng, prompt_len)}, params)
        total_prompt += prompt_len
        total_output += output_len
    preemptions_before = engine.scheduler.num_preemptions
    peak = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.kv_manager.num_used_blocks)
    wall = time.perf_counter() - start
    return ThroughputResult(
        num_requests=num_requests,
        wall_s=wall,
        output_tokens=total_output,
        total_tokens=total_prompt + total_output,
        output_tok_per_s=total_output / wall,
        total_tok_per_s=(total_prompt + total_output) / wall,
        peak_kv_blocks_used=peak,
        kv_blocks_total=engine.kv_manager.pool.num_blocks,
        num_preemptions=engine.scheduler.num_preemptions - preemptions_before,
    )


def as_rows(result: Any) -> list[tuple[str, str]]:
    """A result dataclass as (name, formatted value) rows for the printed table."""
    rows = []
    for key, value in asdict(result).items():
        key = ROW_NAMES.get(key, key)
        if isinstance(value, float):
            rows.append((key, f"{value:,.3f}" if value < 100 else f"{value:,.1f}"))
        elif isinstance(value, list):
            rows.append((key, ", ".join(f"{v:,.1f}" for v in value)))
        else:
            rows.append((key, f"{value:,}" if isinstance(value, int) else str(value)))
    return rows


def spec_rows(stats: dict[str, object]) -> list[tuple[str, str]]:
    """Acceptance figures for a report, from LLMEngine.stats()."""
    if not stats.get("spec_num_verify_steps"):
        return []
    per_position = ", ".join(f"{v:.2f}" for v in stats.get("spec_per_position_acceptance", []))  # type: ignore[union-attr]
    return [
        ("spec acceptance rate", f"{stats['spec_acceptance_rate']:.3f}"),
        ("spec mean accepted length", f"{stats['spec_mean_accepted_length']:.2f}"),
        ("spec per-position acceptance", per_position),
        ("spec draft tokens", f"{stats['spec_num_draft_tokens']:,}"),
    ]
