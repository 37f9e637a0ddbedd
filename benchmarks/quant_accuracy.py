"""Perplexity of a model quantized by every method and algorithm, relative to bfloat16, on held-out English
(`pydoc_data/topics.py`) and held-out Python (tokenmill.quant.calibration.HELDOUT_CODE), texts the default
calibration never reads.

Each configuration is quantized with `tokenmill quantize` into --work-dir (reused when already there), loaded with
`LLM(model=DIR)` and scored from prompt logprobs over non-overlapping windows. `--fake-quant` loads the float twin
of each folder instead (its weights dequantized), so the figures exist before the quantized methods' kernels do;
both compute the same weights, up to the kernels' arithmetic.

    PYTHONPATH=$PWD python benchmarks/quant_accuracy.py --model /work/models/smollm2-135m --fake-quant \
        --json quant_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `tokenmill` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CONFIGS = ("int8:rtn", "fp8:rtn", "fp8:gptq", "int4:rtn", "int4:gptq", "int4:awq", "w2:rtn", "w2:fit",
                   "w2:gptq")
SETS = ("english", "code")


@dataclass
class Row:
    config: str  # "bfloat16" or method:algo[:group[:zp]]
    perplexity: dict[str, float]  # per held-out set
    relative: dict[str, float]  # perplexity / bfloat16's - 1
    quantize_seconds: float | None = None
    quantize_cpu_seconds: float | None = None  # CPU time of the quantizing process (the wall time on an idle machine)


def parse_config(config: str) -> tuple[str, str, int | None, bool]:
    """method:algo[:group[:zp]] -> (method, algo, group or None for the default, zero-point)."""
    parts = config.split(":")
    if len(parts) not in (2, 3, 4) or (len(parts) == 4 and parts[3] != "zp"):
        raise SystemExit(f"--configs: {config!r} is not method:algo[:group[:zp]]")
    group = int(parts[2]) if len(parts) > 2 and parts[2] else None
    return parts[0], parts[1], group, len(parts) == 4


def heldout_windows(tokenizer, window: int, max_tokens: int) -> dict[str, list[list[int]]]:
    """Non-overlapping windows of each held-out text, up to max_tokens tokens per set."""
    from tokenmill.quant.calibration import heldout_code_text, heldout_english_text

    texts = {"english": heldout_english_text(), "code": heldout_code_text()}
    out = {}
    for name, text in texts.items():
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        out[name] = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    return out


def perplexity(llm, windows: list[list[int]]) -> float:
    """exp(mean negative log-likelihood) of every window's tokens after its first, from prompt logprobs."""
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    total, count = 0.0, 0
    for window, output in zip(windows, llm.generate(windows, params)):
        for token, entry in zip(window[1:], output.prompt_logprobs[1:]):
            total -= entry[token].logprob
            count += 1
    return math.exp(total / count)


def score(model_dir: str, windows: dict[str, list[list[int]]], dtype: str, max_model_len: int) -> dict[str, float]:
    from tokenmill import LLM

    llm = LLM(model=model_dir, dtype=dtype, compile=False, max_model_len=max_model_len)
    return {name: perplexity(llm, windows[name]) for name in SETS}


def quantized_folder(model: str, config: str, work_dir: Path, samples: int, calib_window: int,
                     log) -> tuple[Path, float | None, float | None]:
    """The folder of one configuration, made by `tokenmill quantize` unless it is already there, with the wall and
    CPU seconds it took (None when reused). On a shared machine the wall time depends on the other jobs; the CPU
    time does not, and with one thread it is what an idle machine takes."""
    from tokenmill.tools.quantize_model import QuantizeOptions, quantize_checkpoint

    method, algo, group, zero_point = parse_config(config)
    folder = work_dir / config.replace(":", "-")
    if (folder / "config.json").is_file():
        return folder, None, None
    options = QuantizeOptions(method=method, algo=algo, group_size=group, zero_point=zero_point, samples=samples,
                              window=calib_window)
    start, cpu_start = time.perf_counter(), time.process_time()
    quantize_checkpoint(model, folder, options, log=log)
    return folder, time.perf_counter() - start, time.process_time() - cpu_start


def run(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/models/smollm2-135m", help="checkpoint folder or GGUF file")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="method:algo[:group[:zp]] ... (e.g. int4:gptq:64:zp; an empty group is the default)")
    parser.add_argument("--work-dir", default="quant_accuracy_models", help="where quantized folders are kept")
    parser.add_argument("--fake-quant", action="store_true",
                        help="score each folder's dequantized float twin (before the quantized methods exist)")
    parser.add_argument("--dtype", default="bfloat16", help="activation dtype of every run, the baseline's too")
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens scored per held-out set")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (default: the tool's)")
    parser.add_argument("--calib-window", type=int, default=None, help="calibration window (default: the tool's)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--quiet", action="store_true", help="no quantization progress")
    args = parser.parse_args(argv)

    import torch

    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.quant.calibration import DEFAULT_SAMPLES, DEFAULT_WINDOW
    from tokenmill.tools.dequantized_copy import write_dequantized_copy

    torch.set_num_threads(1)  # faster on a shared 2-core machine (docs/perf.md)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    windows = heldout_windows(Tokenizer.from_pretrained(args.model), args.window, args.max_tokens)
    baseline = score(args.model, windows, args.dtype, args.window + 8)
    rows = [Row(args.dtype, baseline, {name: 0.0 for name in SETS})]
    print_row(rows[0])
    for config in args.configs:
        folder, seconds, cpu_seconds = quantized_folder(args.model, config, work_dir, args.samples or DEFAULT_SAMPLES,
                                           args.calib_window or DEFAULT_WINDOW, log)
        if args.fake_quant:
            folder = write_dequantized_copy(folder, work_dir / f"{folder.name}-float")
        ppl = score(str(folder), windows, args.dtype, args.window + 8)
        rows.append(Row(config, ppl, {name: ppl[name] / baseline[name] - 1 for name in SETS}, seconds, cpu_seconds))
        print_row(rows[-1])  # as it comes: a long run's finished rows survive an interrupted one
    print_table(rows, windows)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "fake_quant": args.fake_quant,
                                               "window": args.window, "tokens": {n: len(w) * args.window
                                                                                 for n, w in windows.items()},
                                               "rows": [asdict(r) for r in rows]}, indent=2))
    return rows


def _row_line(row: Row) -> str:
    cells = "".join(f"{row.perplexity[n]:>14.3f}{row.relative[n]:>+10.2%}" for n in SETS)
    seconds = "".join(f"{value:>12.1f}" if value is not None else f"{'':>12}"
                      for value in (row.quantize_seconds, row.quantize_cpu_seconds))
    return f"{row.config:<16}{cells}{seconds}"


def print_row(row: Row) -> None:
    print("row: " + _row_line(row), flush=True)


def print_table(rows: list[Row], windows: dict[str, list[list[int]]]) -> None:
    versus = "vs " + rows[0].config.replace("bfloat16", "bf16")  # the first row is the unquantized baseline
    print(f"{'config':<16}" + "".join(f"{name + ' ppl':>14}{versus:>10}" for name in SETS)
          + f"{'quantize s':>12}{'CPU s':>12}")
    for row in rows:
        print(_row_line(row))
    print("windows: " + ", ".join(f"{n} {len(w)}" for n, w in windows.items()))


if __name__ == "__main__":
    run()
