"""`tokenmill bench stream`: one long request streamed as a user streams it; is the per-token time flat?

Streaming n tokens should cost O(n): the last tokens of a long request should arrive as fast as the first
(up to what attention over a longer context inherently adds). The recipe streams ONE greedy request
(ignore_eos) through `stream_request`, the loop behind `LLM.stream`, stamps the wall time at which each
token reaches the consumer, and compares the first and the last `window` decode tokens (the first token
comes from the prefill and is left out). Each window is summarised two ways: the median of its per-token
gaps (robust to a stray pause on a shared machine) and its mean (window time / tokens; it stays meaningful
when speculative decoding delivers several tokens per step, where most gaps are 0).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from tokenmill.bench.prompts import PromptMaker, random_prompts
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.llm import stream_request
from tokenmill.sampling_params import SamplingParams

DEFAULT_OUTPUT_LEN = 2000
DEFAULT_WINDOW = 100
_WARMUP_TOKENS = 32


@dataclass
class StreamResult:
    input_len: int
    output_len: int
    window: int
    first_ms_per_token_median: float  # median gap between consecutive tokens over decode tokens 1..window
    last_ms_per_token_median: float  # the same over the last `window` tokens
    ratio_median: float | None  # last / first (None when the first window's median gap is 0)
    first_ms_per_token_mean: float  # window wall time / window tokens
    last_ms_per_token_mean: float
    ratio_mean: float | None  # last / first
    ttft_s: float
    total_s: float
    text_chars: int


def check_stream_args(engine: LLMEngine, input_len: int, output_len: int, window: int) -> None:
    """Fail before running when the request cannot produce the tokens the report needs."""
    if input_len < 1:
        raise InvalidRequestError("--input-len", f"must be >= 1, got {input_len}")
    need = input_len + output_len
    if need > engine.max_model_len:
        model_limit = engine.arch.max_position_embeddings
        remedy = (f"raise --max-model-len (up to the model's {model_limit})" if engine.max_model_len < model_limit
                  else f"use a model with a longer context (this one's max_position_embeddings is {model_limit})")
        raise InvalidRequestError(
            "max_model_len",
            f"bench stream needs --input-len {input_len} + --output-len {output_len} = {need} tokens of context, "
            f"but max_model_len is {engine.max_model_len}: {remedy}, or shorten --output-len / --input-len",
        )
    if window < 1 or output_len - 1 < 2 * window:
        raise InvalidRequestError(
            "--output-len",
            f"must give at least 2 x --window ({window}) decode tokens after the first token, got {output_len}",
        )


def stream_token_times(engine: LLMEngine, request_id: str, prompt_ids: list[int],
                       output_len: int) -> tuple[float, list[float], str]:
    """Stream one request: (start time, the time each token reached the consumer, the text)."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, output_kind="delta")
    pieces: list[str] = []
    times: list[float] = []
    start = time.perf_counter()
    for output in stream_request(engine, request_id, {"prompt_token_ids": prompt_ids}, params):
        now = time.perf_counter()
        for completion in output.outputs:
            pieces.append(completion.text)  # what a consumer does with a delta: keep its text
            times.extend([now] * len(completion.token_ids))
    return start, times, "".join(pieces)


def run_stream(engine: LLMEngine, input_len: int = 128, output_len: int = DEFAULT_OUTPUT_LEN,
               window: int = DEFAULT_WINDOW, seed: int = 0, prompts: PromptMaker | None = None) -> StreamResult:
    check_stream_args(engine, input_len, output_len, window)
    rng = random.Random(seed)
    make = prompts or random_prompts(engine.arch.vocab_size)
    # Warm up first, so one-time costs (allocator, first kernels) do not land in the first window.
    stream_token_times(engine, "stream-warmup", make(rng, input_len), min(_WARMUP_TOKENS, output_len))
    start, times, text = stream_token_times(engine, "stream", make(rng, input_len), output_len)
    if len(times) != output_len:
        raise RuntimeError(f"bench stream: the request produced {len(times)} tokens, expected {output_len}")
    gaps = [b - a for a, b in zip(times, times[1:])]  # one per decode token
    first, last = gaps[:window], gaps[-window:]
    first_median, last_median = statistics.median(first), statistics.median(last)
    first_mean, last_mean = sum(first) / window, sum(last) / window
    return StreamResult(
        input_len=input_len,
        output_len=output_len,
        window=window,
        first_ms_per_token_median=1e3 * first_median,
        last_ms_per_token_median=1e3 * last_median,
        ratio_median=last_median / first_median if first_median > 0 else None,
        first_ms_per_token_mean=1e3 * first_mean,
        last_ms_per_token_mean=1e3 * last_mean,
        ratio_mean=last_mean / first_mean if first_mean > 0 else None,
        ttft_s=times[0] - start,
        total_s=times[-1] - start,
        text_chars=len(text),
    )
