"""`tokenmill bench latency | throughput`: the BENCHMARKS.md recipes, a printed table and --json."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tokenmill.config import DTYPES
from tokenmill.spec_decode.cli_args import add_spec_args, spec_config_from_args, spec_rows


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="latency / throughput / stream benchmarks (see BENCHMARKS.md)")
    bench.add_argument("recipe", choices=["latency", "throughput", "stream"])
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint folder (default: models/tokenmill-py-13m)")
    source.add_argument("--model-config", help="a config.json: model shape only, with --load-format random")
    bench.add_argument("--load-format", default="auto", choices=["auto", "random"])
    bench.add_argument("--dtype", default="auto", choices=DTYPES)
    bench.add_argument("--device", default="auto")
    bench.add_argument("--max-model-len", type=int, default=None)
    bench.add_argument("--max-num-seqs", type=int, default=256)
    bench.add_argument("--max-num-batched-tokens", type=int, default=2048)
    bench.add_argument("--num-kv-blocks", type=int, default=None)
    bench.add_argument("--kv-cache-memory-gb", type=float, default=2.0)
    bench.add_argument("--input-len", type=int, default=128)
    bench.add_argument("--output-len", type=int, default=None, help="default: 256, or 2000 for stream")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--num-prompts", type=int, default=256)
    bench.add_argument("--min-len", type=int, default=100)
    bench.add_argument("--max-len", type=int, default=1024)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--prompt-files", nargs="+", default=None, metavar="PATH",
                       help="cut prompts from these .py files / folders instead of random token ids "
                            "(speculative decoding needs real text)")
    bench.add_argument("--peer", choices=["none", "transformers"], default="none",
                       help="also time transformers generate on the same model (latency)")
    bench.add_argument("--structured", choices=["none", "json", "compare"], default="none",
                       help="json: constrain every request's output to a JSON schema; compare (latency): "
                            "interleave constrained and unconstrained batches and report the grammar's overhead")
    bench.add_argument("--pairs", type=int, default=5, help="constrained/unconstrained pairs for --structured compare")
    bench.add_argument("--temperature", type=float, default=None,
                       help="sampling temperature (default: 0, or 1 with --structured json)")
    add_spec_args(bench)
    bench.add_argument("--speculative-compare", default=None, metavar="METHODS",
                       help="latency: compare these speculative methods (comma-separated, e.g. ngram,draft) with "
                            "no speculation, one engine each, on the same prompts in rotating order; --runs rounds")
    bench.add_argument("--window", type=int, default=None,
                       help="stream: compare the per-token time of the first and the last WINDOW decode tokens "
                            "(default: 100)")
    bench.add_argument("--json", dest="json_path", default=None, help="write the full result here")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    from tokenmill.bench.recipes import as_rows, run_latency, run_throughput

    if args.recipe == "stream":
        from tokenmill.bench.stream import DEFAULT_OUTPUT_LEN, DEFAULT_WINDOW

        args.output_len = DEFAULT_OUTPUT_LEN if args.output_len is None else args.output_len
        args.window = DEFAULT_WINDOW if args.window is None else args.window
    elif args.output_len is None:
        args.output_len = 256
    if args.structured == "compare" and args.recipe != "latency":
        raise SystemExit("error: --structured compare runs with the latency recipe only")
    if args.speculative_compare is not None:
        return _cmd_spec_compare(args)
    with _model_source(args, args.speculative_method) as (model_path, load_format):
        start = time.perf_counter()
        engine = _build_engine(args, model_path, load_format, spec_config_from_args(args))
        startup_s = time.perf_counter() - start
        prompts = _prompts(args, engine)
        if args.structured == "compare":
            from tokenmill.bench.structured_overhead import run_structured_overhead

            result = run_structured_overhead(engine, args.input_len, args.output_len, args.batch_size, args.pairs,
                                             args.seed, args.temperature, prompts)
        elif args.recipe == "stream":
            from tokenmill.bench.stream import run_stream

            result = run_stream(engine, args.input_len, args.output_len, args.window, args.seed, prompts)
        elif args.recipe == "latency":
            result = run_latency(engine, args.input_len, args.output_len, args.batch_size, args.runs, args.seed,
                                 args.structured, args.temperature, prompts)
        else:
            result = run_throughput(engine, args.num_prompts, args.min_len, args.max_len, args.seed, args.structured,
                                    args.temperature, prompts)
        report = {"recipe": args.recipe, "structured": args.structured, "temperature": args.temperature,
                  "prompts": args.prompt_files or "random token ids",
                  "device": _device_name(engine.device), "dtype": str(engine.dtype),
                  "startup_s": startup_s, "result": asdict(result)}
        rows = [("device", report["device"]), ("dtype", report["dtype"]), ("startup_s", f"{startup_s:.2f}")]
        rows += as_rows(result)
        stats = engine.stats()
        rows += spec_rows(stats)
        report["spec_decoding"] = {k: v for k, v in stats.items() if k.startswith("spec_")}
        if args.peer == "transformers" and args.recipe == "latency":
            peer = time_transformers_generate(model_path, load_format, engine.dtype, engine.device,
                                              args.input_len, args.output_len, args.seed)
            report["peer_transformers_tok_per_s"] = peer
            rows.append(("transformers tok/s", f"{peer:,.1f}"))
            rows.append(("tokenmill / transformers", f"{result.tok_per_s / peer:.2f}x"))
    _print_rows(args.recipe + (" (structured compare)" if args.structured == "compare" else ""), rows)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))


@contextmanager
def _model_source(args: argparse.Namespace, spec_method: str | None) -> Iterator[tuple[str, str]]:
    """(model path, load format) for the engines; fills in args.draft_model from the default pair.

    --model-config: random weights of that shape, from a temporary folder that lives while the block runs
    (a draft model, if any, must be given)."""
    from tokenmill.config import DRAFT_MODEL_METHODS
    from tokenmill.default_model import resolve_models

    if not args.model_config:
        model_path, args.draft_model = resolve_models(args.model, spec_method, args.draft_model)
        yield model_path, args.load_format
        return
    if spec_method in DRAFT_MODEL_METHODS and not args.draft_model:
        raise SystemExit("error: with --model-config, draft methods need --draft-model")
    workdir = tempfile.mkdtemp(prefix="tokenmill-bench-")
    try:
        shutil.copy(args.model_config, Path(workdir) / "config.json")
        yield workdir, "random"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _prompts(args: argparse.Namespace, engine: Any) -> Any:
    """Prompts cut from --prompt-files, or None for random token ids."""
    from tokenmill.bench.prompts import text_prompts

    if not args.prompt_files:
        return None
    if engine.tokenizer is None:
        raise SystemExit("error: --prompt-files needs a checkpoint with a tokenizer (not --model-config)")
    return text_prompts(engine.tokenizer, args.prompt_files)


def _print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _build_engine(args: argparse.Namespace, model_path: str, load_format: str, spec: Any) -> Any:
    from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig
    from tokenmill.engine.engine import LLMEngine

    return LLMEngine(
        EngineConfig(
            model=model_path,
            dtype=args.dtype,
            device=args.device,
            load_format=load_format,
            max_model_len=args.max_model_len,
            seed=args.seed,
            cache=CacheConfig(
                num_kv_blocks=args.num_kv_blocks, kv_cache_memory_bytes=int(args.kv_cache_memory_gb * (1 << 30))
            ),
            scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
            spec=spec,
        ),
        show_progress=True,
    )


def _cmd_spec_compare(args: argparse.Namespace) -> None:
    """--speculative-compare: one engine per method (and one without speculation), same prompts each round."""
    from dataclasses import replace

    from tokenmill.bench.spec_compare import BASELINE, compare_rows, run_spec_compare
    from tokenmill.config import DRAFT_MODEL_METHODS, SPEC_METHODS

    methods = [m.strip() for m in args.speculative_compare.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SPEC_METHODS]
    if args.recipe != "latency" or not methods or unknown:
        raise SystemExit(f"error: --speculative-compare takes methods from {', '.join(SPEC_METHODS)} (got "
                         f"{args.speculative_compare!r}), with the latency recipe")
    needs_draft = any(m in DRAFT_MODEL_METHODS for m in methods)
    spec = spec_config_from_args(args)
    with _model_source(args, "draft" if needs_draft else None) as (model_path, load_format):
        engines = {BASELINE: _build_engine(args, model_path, load_format, replace(spec, method=None))}
        for method in methods:
            engines[method] = _build_engine(args, model_path, load_format,
                                            replace(spec, method=method, draft_model=args.draft_model))
    result = run_spec_compare(engines, args.input_len, args.output_len, args.batch_size, args.runs, args.seed,
                              args.temperature or 0.0, _prompts(args, engines[BASELINE]))
    rows = [("device", _device_name(engines[BASELINE].device)), ("dtype", str(engines[BASELINE].dtype))]
    _print_rows("latency (speculative compare)", rows + compare_rows(result))
    if args.json_path:
        report = {"recipe": "latency", "speculative_compare": methods, "prompts": args.prompt_files or "random token ids",
                  "result": asdict(result)}
        Path(args.json_path).write_text(json.dumps(report, indent=2))


def time_transformers_generate(
    model_path: str, load_format: str, dtype: torch.dtype, device: torch.device, input_len: int, output_len: int, seed: int
) -> float:
    """Decode tok/s of transformers greedy generate at batch 1 on the same weights (or shape, if random)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "random":
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, input_len), generator=generator).to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=output_len, max_new_tokens=output_len)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        first = _timed(lambda: model.generate(ids, **{**kwargs, "min_new_tokens": 1, "max_new_tokens": 1}), device)
        total = _timed(lambda: model.generate(ids, **kwargs), device)
    return (output_len - 1) / max(total - first, 1e-9)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
