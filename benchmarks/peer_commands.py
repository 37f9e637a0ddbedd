"""How each system of the CPU comparison is run, and how its decode tok/s is read back from its output.

Every system decodes `output_len` tokens after a prompt of `input_len` tokens, at the same batch size:
  tokenmill     `python -m tokenmill bench latency --json` (decode after every request's first token)
  llama.cpp     batch 1: `llama-bench -p 0 -n OUT -d IN` (tg at depth IN);
                batch B: `llama-batched-bench -npp IN -ntg OUT -npl B`, its S_TG (speed_tg)
  transformers  `python -m tokenmill.bench.transformers_peer` (generate, decode-only)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# llama.cpp's default context in the recipe; raised when B sequences of IN + OUT tokens need more.
LLAMACPP_MIN_CONTEXT = 8192


@dataclass
class Figures:
    tok_per_s: float  # decode tokens per second of the whole batch
    extra: dict[str, Any] = field(default_factory=dict)  # what else the system reported (TTFT, ceiling, ...)


class OutputError(ValueError):
    """A tool's output did not hold the figure asked for."""


def tokenmill_command(python: str, model: str, dtype: str, batch_size: int, input_len: int, output_len: int,
                      json_path: Path, extra_args: list[str]) -> list[str]:
    # One warm-up and one timed run per round: the rounds, interleaved with the peers, give the median.
    return [python, "-m", "tokenmill", "bench", "latency", "--model", model, "--dtype", dtype, "--device", "cpu",
            "--batch-size", str(batch_size), "--input-len", str(input_len), "--output-len", str(output_len),
            "--runs", "1", "--json", str(json_path), *extra_args]


def transformers_command(python: str, model: str, dtype: str, batch_size: int, input_len: int, output_len: int,
                         json_path: Path) -> list[str]:
    return [python, "-m", "tokenmill.bench.transformers_peer", "--model", model, "--dtype", dtype,
            "--batch-size", str(batch_size), "--input-len", str(input_len), "--output-len", str(output_len),
            "--runs", "1", "--json", str(json_path)]


def llamacpp_command(bin_dir: Path, gguf: str, batch_size: int, input_len: int, output_len: int,
                     threads: int) -> list[str]:
    if batch_size == 1:
        return [str(bin_dir / "llama-bench"), "-m", gguf, "-p", "0", "-n", str(output_len), "-d", str(input_len),
                "-t", str(threads), "-r", "1", "-o", "json"]
    context = max(LLAMACPP_MIN_CONTEXT, batch_size * (input_len + output_len))
    return [str(bin_dir / "llama-batched-bench"), "-m", gguf, "-npp", str(input_len), "-ntg", str(output_len),
            "-npl", str(batch_size), "-t", str(threads), "-c", str(context), "--output-format", "jsonl"]


def parse_llamacpp(stdout: str, batch_size: int, input_len: int, output_len: int) -> Figures:
    if batch_size == 1:
        return parse_llama_bench(stdout, input_len, output_len)
    return parse_batched_bench(stdout, batch_size, input_len, output_len)


def parse_llama_bench(stdout: str, input_len: int, output_len: int) -> Figures:
    """`llama-bench -o json`: a JSON list of tests; the generation test at depth `input_len`, its avg_ts."""
    try:
        tests = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise OutputError(f"llama-bench printed no JSON list ({exc}): {stdout[-300:]!r}") from exc
    for test in tests:
        if (test.get("n_prompt"), test.get("n_gen"), test.get("n_depth")) == (0, output_len, input_len):
            return Figures(float(test["avg_ts"]), {"samples_ts": test.get("samples_ts", []),
                                                   "model_type": test.get("model_type"),
                                                   "threads": test.get("n_threads")})
    raise OutputError(f"llama-bench reported no test with n_prompt 0, n_gen {output_len}, n_depth {input_len}")


def parse_batched_bench(stdout: str, batch_size: int, input_len: int, output_len: int) -> Figures:
    """`llama-batched-bench --output-format jsonl`: one JSON object per (pp, tg, pl); S_TG is speed_tg."""
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue  # blank lines around the records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OutputError(f"llama-batched-bench printed a line that is not JSON ({exc}): {line[:200]!r}") from exc
        if (record.get("pp"), record.get("tg"), record.get("pl")) == (input_len, output_len, batch_size):
            return Figures(float(record["speed_tg"]), {"ttft_s": float(record["t_pp"]),
                                                       "threads": record.get("n_threads")})
    raise OutputError(f"llama-batched-bench reported no line with pp {input_len}, tg {output_len}, pl {batch_size}")


def parse_tokenmill(report: dict[str, Any]) -> Figures:
    """The `tokenmill bench latency --json` report."""
    result = report["result"]
    return Figures(float(result["tok_per_s"]), {
        "ttft_s": result["ttft_s"], "ceiling_tok_per_s": result["ceiling_tok_per_s"],
        "pct_of_ceiling": result["pct_of_ceiling"], "bandwidth_gb_per_s": result["bandwidth_gb_per_s"],
        "device": report.get("device"),
    })


def parse_transformers(report: dict[str, Any]) -> Figures:
    """The `python -m tokenmill.bench.transformers_peer --json` report."""
    result = report["result"]
    return Figures(float(result["tok_per_s"]), {"ttft_s": result["ttft_s"], "threads": report.get("threads")})
