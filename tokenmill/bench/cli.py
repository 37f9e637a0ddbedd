"""`tokenmill bench latency | throughput`: the BENCHMARKS.md recipes, a printed table and --json."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine_args import EngineArgs
from tokenmill.errors import ConfigError


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="latency / throughput / stream benchmarks (see BENCHMARKS.md)")
    bench.add_argument("recipe", choices=["latency", "throughput", "stream", "prefix"])
    EngineArgs.add_cli_args(bench)  # --seed seeds the engine and the recipes' prompts alike
    bench.add_argument("--model-config", help="a config.json: model shape only, random weights (instead of --model)")
    bench.add_argument("--input-len", type=int, default=128)
    bench.add_argument("--output-len", type=int, default=None, help="default: 256, or 2000 for stream")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--num-prompts", type=int, default=256)
    bench.add_argument("--min-len", type=int, default=100)
    bench.add_argument("--max-len", type=int, default=1024)
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
    bench.add_argument("--speculative-compare", default=None, metavar="METHODS",
                       help="latency: compare these speculative methods (comma-separated, e.g. ngram,draft) with "
                            "no speculation, one engine each, on the same prompts in rotating order; --runs rounds")
    bench.add_argument("--window", type=int, default=None,
                       help="stream: compare the per-token time of the first and the last WINDOW decode tokens "
                            "(default: 100)")
    bench.add_argument("--system-len", type=int, default=1000, help="prefix: shared system prompt tokens")
    bench.add_argument("--history-len", type=int, default=2000, help="prefix: each conversation's own history tokens")
    bench.add_argument("--conversations", type=int, default=4, help="prefix: conversations (the pool holds ~one)")
    bench.add_argument("--json", dest="json_path", default=None, help="write the full result here")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    from tokenmill.bench.recipes import as_rows, run_latency, run_throughput, spec_rows

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
    if args.recipe == "prefix":
        return _cmd_prefix(args)
    with _engine_args(args) as engine_args:
        start = time.perf_counter()
        engine = _build_engine(engine_args.create_engine_config())
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
                  "startup_s": startup_s, "compiled": engine.worker.compile,
                  "compile_s": engine.worker.compile_seconds, "result": asdict(result)}
        rows = [("device", report["device"]), ("dtype", report["dtype"]), ("startup_s", f"{startup_s:.2f}"),
                ("compiled", f"yes, {report['compile_s']:.1f} s of the start-up" if engine.worker.compile else "no")]
        graphs = engine.worker.runner.graphs
        report["cuda_graph_sizes"] = graphs.sizes if graphs is not None else []
        rows.append(("cuda graphs", f"{len(graphs.sizes)} sizes, captured in {graphs.capture_seconds:.1f} s"
                     if graphs is not None else "no"))
        rows += as_rows(result)
        stats = engine.stats()
        rows += spec_rows(stats)
        report["spec_decoding"] = {k: v for k, v in stats.items() if k.startswith("spec_")}
        if args.peer == "transformers" and args.recipe == "latency":
            rows += _transformers_rows(args, report, engine.config.model, engine.config.load_format, engine)
    _print_rows(args.recipe + (" (structured compare)" if args.structured == "compare" else ""), rows)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))


@contextmanager
def _engine_args(args: argparse.Namespace) -> Iterator[EngineArgs]:
    """The engine flags; with --model-config, random weights of that shape from a temporary folder that lives
    while the block runs (a draft model, if any, must then be given)."""
    engine_args = EngineArgs.from_cli_args(args)
    if not args.model_config:
        yield engine_args
        return
    if args.model is not None:
        raise ConfigError("model_config", "give --model or --model-config, not both")
    workdir = tempfile.mkdtemp(prefix="tokenmill-bench-")
    try:
        shutil.copy(args.model_config, Path(workdir) / "config.json")
        yield replace(engine_args, model=workdir, load_format="random")
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


def _build_engine(config: EngineConfig) -> Any:
    from tokenmill.engine.engine import LLMEngine

    return LLMEngine(config, show_progress=True)


def _cmd_spec_compare(args: argparse.Namespace) -> None:
    """--speculative-compare: one engine per method (and one without speculation), same prompts each round."""
    from tokenmill.bench.spec_compare import BASELINE, compare_rows, run_spec_compare
    from tokenmill.config import SPEC_METHODS

    methods = [m.strip() for m in args.speculative_compare.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SPEC_METHODS]
    if args.recipe != "latency" or not methods or unknown:
        raise SystemExit(f"error: --speculative-compare takes methods from {', '.join(SPEC_METHODS)} (got "
                         f"{args.speculative_compare!r}), with the latency recipe")
    with _engine_args(args) as engine_args:
        # Every config is checked before the first engine loads, so a bad one fails fast.
        configs = {method: replace(engine_args, speculative_method=method).create_engine_config()
                   for method in methods}
        engines = {BASELINE: _build_engine(replace(engine_args, speculative_method=None).create_engine_config())}
        engines.update({method: _build_engine(config) for method, config in configs.items()})
    result = run_spec_compare(engines, args.input_len, args.output_len, args.batch_size, args.runs, args.seed,
                              args.temperature or 0.0, _prompts(args, engines[BASELINE]))
    rows = [("device", _device_name(engines[BASELINE].device)), ("dtype", str(engines[BASELINE].dtype))]
    _print_rows("latency (speculative compare)", rows + compare_rows(result))
    if args.json_path:
        report = {"recipe": "latency", "speculative_compare": methods, "prompts": args.prompt_files or "random token ids",
                  "result": asdict(result)}
        Path(args.json_path).write_text(json.dumps(report, indent=2))


def _cmd_prefix(args: argparse.Namespace) -> None:
    """The prefix-reuse recipe: the KV tiers' sizes come from --kv-host-bytes / --kv-disk-*, or defaults; the pool
    (--num-kv-blocks) defaults to one conversation's blocks, so returning ones were evicted."""
    from tokenmill.bench.prefix import make_workload, prefix_rows, run_prefix
    from tokenmill.byte_sizes import parse_byte_size
    from tokenmill.models.loader import read_checkpoint_arch

    if args.output_len is None:
        args.output_len = 16
    longest = args.system_len + args.history_len + args.output_len + 2 * 32 + 1
    with _engine_args(args) as engine_args:
        block = engine_args.block_size
        base = replace(engine_args, kv_host_bytes=0, kv_disk_path=None, kv_disk_bytes=0,
                       max_model_len=engine_args.max_model_len or longest,
                       num_kv_blocks=engine_args.num_kv_blocks or -(-longest // block) + 2)
        host = parse_byte_size("kv_host_bytes", engine_args.kv_host_bytes or "8GiB")
        disk = parse_byte_size("kv_disk_bytes", engine_args.kv_disk_bytes or "16GiB")
        seen: dict[str, str] = {}

        def build(overrides: dict[str, Any]) -> Any:
            engine = _build_engine(replace(base, **overrides).create_engine_config())
            seen.update(device=_device_name(engine.device), dtype=str(engine.dtype))
            return engine

        vocab_size = read_checkpoint_arch(base.create_engine_config().model).vocab_size
        workload = make_workload(vocab_size, args.system_len, args.history_len, args.conversations, 32, args.seed)
        result = run_prefix(build, workload, args.output_len, host, disk, engine_args.kv_disk_path)
    rows = [("device", seen["device"]), ("dtype", seen["dtype"]), ("kv pool blocks", str(base.num_kv_blocks))]
    _print_rows("prefix reuse (KV tiers)", rows + prefix_rows(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"recipe": "prefix", "result": asdict(result)}, indent=2))


def _transformers_rows(args: argparse.Namespace, report: dict[str, Any], model_path: str, load_format: str,
                       engine: Any) -> list[tuple[str, str]]:
    """--peer transformers: its decode tok/s at the same batch and lengths, into the report and the table."""
    from tokenmill.bench.transformers_peer import time_transformers_generate

    peer = time_transformers_generate(model_path, load_format, engine.dtype, engine.device, args.input_len,
                                      args.output_len, args.batch_size, args.runs, args.seed)
    # No decode to compare when --output-len is 1.
    ratio = report["result"]["tok_per_s"] / peer.tok_per_s if peer.tok_per_s > 0 else None
    report["peer_transformers"] = {**asdict(peer), "tokenmill_over_transformers": ratio}
    return [("transformers tok/s", f"{peer.tok_per_s:,.1f}"), ("transformers ttft_s", f"{peer.ttft_s:.3f}"),
            ("tokenmill / transformers", "-" if ratio is None else f"{ratio:.2f}x")]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
