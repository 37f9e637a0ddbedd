"""The sections of the device check (bench/device_check.py): each a function of a shared Context that returns
a JSON-able dict. Sizes come from a Plan: the real shapes on a GPU, tiny ones for the CPU dry run."""

from __future__ import annotations

import gc
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenmill.bench.roofline import Bandwidth, measure_copy_bandwidth, measure_cpu_read_bandwidth

SHAPES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "shapes"
# Same families as the real shapes, small enough for a CPU run of seconds.
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024}
PARITY_MODEL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
                "eos_token_id": 2, **TINY}
# Random weights this wide give clear argmax margins, so float32 greedy tokens do not flip on rounding.
PARITY_WEIGHT_STD = 0.15
PARITY_KV = "64MiB"


@dataclass(frozen=True)
class Plan:
    """What the check runs, sized for the device (full) or for a CPU dry run."""

    full: bool
    shapes: dict[str, dict[str, Any]]  # name -> config.json of the benchmark models
    input_len: int = 128
    output_len: int = 256
    latency_runs: int = 3
    throughput_prompts: int = 256
    throughput_min_len: int = 100
    throughput_max_len: int = 1024
    max_model_len: int = 4096
    bandwidth_bytes: int = 2 << 30
    parity_prompts: tuple[int, ...] = (5, 17, 33, 64)
    parity_new_tokens: int = 32

    @classmethod
    def for_run(cls, dry_run: bool) -> Plan:
        shapes = {name: json.loads((SHAPES_DIR / f"{file}.json").read_text())
                  for name, file in (("llama-3-8b", "llama-3-8b"), ("qwen3-0.6b", "qwen3-0.6b"))}
        if not dry_run:
            return cls(full=True, shapes=shapes)
        tiny = {name: {**config, **TINY} for name, config in shapes.items()}
        return cls(full=False, shapes=tiny, input_len=16, output_len=8, latency_runs=1, throughput_prompts=4,
                   throughput_min_len=4, throughput_max_len=12, max_model_len=256, bandwidth_bytes=32 << 20,
                   parity_prompts=(3, 9), parity_new_tokens=6)


@dataclass
class Context:
    plan: Plan
    device: torch.device
    workdir: Path
    bandwidth: Bandwidth | None = None
    engines: dict[str, Any] = field(default_factory=dict)  # benchmark engines by shape, built by `startup`


def kernels(ctx: Context) -> dict[str, Any]:
    """Every Triton kernel against its torch twin at full shapes, bf16 and fp32 (tokenmill.kernels.checks)."""
    from tokenmill.kernels.checks import kernel_cases
    from tokenmill.kernels.lora_checks import lora_kernel_cases
    from tokenmill.kernels.quant_checks import quant_kernel_cases

    results = []
    for dtype in (torch.bfloat16, torch.float32):
        cases = kernel_cases(full=ctx.plan.full, device=ctx.device, dtype=dtype)
        cases += quant_kernel_cases(full=ctx.plan.full, device=ctx.device, dtype=dtype)  # the quantized matmuls
        cases += lora_kernel_cases(full=ctx.plan.full, device=ctx.device, dtype=dtype)  # the batched LoRA matmul
        for case in cases:
            started = time.perf_counter()
            try:
                outcome = dict(case.run())
            except Exception as error:  # one broken kernel must not hide the others' results
                outcome = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            results.append({"name": case.name, "dtype": str(dtype), "seconds": time.perf_counter() - started,
                            **outcome})
    failed = [f"{r['name']} ({r['dtype']})" for r in results if not r.get("ok")]
    return {"ok": not failed and bool(results), "cases": results, "failed": failed,
            "summary": f"{len(results) - len(failed)}/{len(results)} kernel cases within tolerance"}


def bandwidth(ctx: Context) -> dict[str, Any]:
    """The bandwidth every ceiling divides by, measured here: a big device-to-device copy (read + write)."""
    if ctx.device.type == "cuda":
        ctx.bandwidth = Bandwidth(measure_copy_bandwidth(ctx.device, ctx.plan.bandwidth_bytes), "copy, read + write")
    else:
        ctx.bandwidth = Bandwidth(measure_cpu_read_bandwidth(ctx.plan.bandwidth_bytes), "read")
    return {"ok": True, "gb_per_s": ctx.bandwidth.bytes_per_s / 1e9, "kind": ctx.bandwidth.kind,
            "buffer_bytes": ctx.plan.bandwidth_bytes, "summary": f"{ctx.bandwidth.bytes_per_s / 1e9:,.0f} GB/s"}


def parity(ctx: Context) -> dict[str, Any]:
    """float32 greedy tokens of a tiny random model on the device (eager, and with CUDA graphs where they are
    used) equal those of the CPU reference with the same weights."""
    from tokenmill.models.loader import init_random_weights

    model_dir = _write_config(ctx.workdir / "parity", PARITY_MODEL)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, TINY["vocab_size"]) for _ in range(n)] for n in ctx.plan.parity_prompts]
    # A fixed small pool on the device too: 90% of an H200 in blocks of a tiny model would be tens of millions
    # of blocks for the scheduler to track.
    reference = _engine(model_dir, "cpu", "float32", 256, enforce_eager=True, kv_cache_memory=PARITY_KV)
    init_random_weights(reference.model, seed=0, std=PARITY_WEIGHT_STD)
    expected = _greedy(reference, prompts, ctx.plan.parity_new_tokens)
    runs: dict[str, Any] = {}
    for variant, eager in (("eager", True), ("graphs", False)):
        engine = _engine(model_dir, str(ctx.device), "float32", 256, enforce_eager=eager, kv_cache_memory=PARITY_KV)
        with torch.no_grad():
            for mine, theirs in zip(engine.model.parameters(), reference.model.parameters(), strict=True):
                mine.copy_(theirs)
        tokens = _greedy(engine, prompts, ctx.plan.parity_new_tokens)
        mismatches = [{"prompt": i, "first_difference_at": next(j for j, (a, b) in enumerate(zip(t, e)) if a != b)}
                      for i, (t, e) in enumerate(zip(tokens, expected)) if t != e]
        runs[variant] = {"equal": not mismatches, "mismatches": mismatches,
                         "cuda_graphs": engine.worker.runner.graphs is not None}
        _release(engine)
    _release(reference)
    ok = all(run["equal"] for run in runs.values())
    return {"ok": ok, "runs": runs, "prompts": len(prompts), "new_tokens": ctx.plan.parity_new_tokens,
            "summary": "same tokens as the CPU" if ok else "tokens differ from the CPU reference"}


def startup(ctx: Context, shape: str) -> dict[str, Any]:
    """Build the benchmark engine of a shape (random weights on the device, memory profile, graph capture)."""
    model_dir = _write_config(ctx.workdir / shape, ctx.plan.shapes[shape])
    started = time.perf_counter()
    engine = _engine(model_dir, str(ctx.device), "bfloat16", ctx.plan.max_model_len, enforce_eager=False)
    _synchronize(ctx.device)
    seconds = time.perf_counter() - started
    ctx.engines[shape] = engine
    graphs = engine.worker.runner.graphs
    return {"ok": True, "seconds": seconds, "kv_blocks": engine.kv_manager.pool.num_blocks,
            "cuda_graphs": graphs is not None, "graph_sizes": graphs.sizes if graphs else [],
            "graph_capture_s": graphs.capture_seconds if graphs else 0.0, "compile_s": engine.worker.compile_seconds,
            "summary": f"{seconds:.1f} s" + (f" ({len(graphs.sizes)} graphs)" if graphs else " (no graphs)")}


def latency(ctx: Context, shape: str) -> dict[str, Any]:
    from tokenmill.bench.recipes import run_latency

    plan = ctx.plan
    result = run_latency(_built(ctx, shape), plan.input_len, plan.output_len, batch_size=1, runs=plan.latency_runs,
                         bandwidth=ctx.bandwidth)
    return {"ok": True, **asdict(result),
            "summary": f"{result.tok_per_s:,.1f} tok/s, {result.pct_of_ceiling:.0f}% of "
                       f"{result.ceiling_tok_per_s:,.0f} tok/s ceiling"}


def throughput(ctx: Context, shape: str) -> dict[str, Any]:
    from tokenmill.bench.recipes import run_throughput

    plan = ctx.plan
    result = run_throughput(_built(ctx, shape), plan.throughput_prompts, plan.throughput_min_len,
                            plan.throughput_max_len)
    return {"ok": True, **asdict(result), "summary": f"{result.output_tok_per_s:,.0f} output tok/s"}


def release_engine(ctx: Context, shape: str) -> None:
    engine = ctx.engines.pop(shape, None)
    if engine is not None:
        _release(engine)


def _built(ctx: Context, shape: str) -> Any:
    if shape not in ctx.engines:
        raise RuntimeError(f"the {shape} engine did not start (see its startup section)")
    return ctx.engines[shape]


def _write_config(folder: Path, config: dict[str, Any]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _engine(model_dir: str, device: str, dtype: str, max_model_len: int, enforce_eager: bool,
            kv_cache_memory: str | None = None) -> Any:
    """An engine with random weights; its KV pool profiled on a GPU unless kv_cache_memory fixes it (the CPU
    always gets a fixed budget: a few times the context is plenty there)."""
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.engine_args import EngineArgs

    if kv_cache_memory is None and device == "cpu":
        kv_cache_memory = "64MiB"
    args = EngineArgs(model=model_dir, load_format="random", device=device, dtype=dtype,
                      max_model_len=max_model_len, enforce_eager=enforce_eager, compile=False,
                      kv_cache_memory=kv_cache_memory)
    return LLMEngine(args.create_engine_config())


def _greedy(engine: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, output_kind="final_only")
    for index, prompt in enumerate(prompts):
        engine.add_request(f"parity-{index}", {"prompt_token_ids": prompt}, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = list(output.outputs[0].token_ids)
    return [tokens[f"parity-{index}"] for index in range(len(prompts))]


def _release(engine: Any) -> None:
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tokenmill-device-check-"))
