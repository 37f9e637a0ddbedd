"""Where one decode step's time goes: torch profiler self time per category, batch 1, in ms per step.

    PYTHONPATH=$PWD python benchmarks/step_profile.py --model DIR --dtype float32 [--compile on|off]

The step time is the median of 40 unprofiled steps; the categories come from 20 profiled steps, and
"python and framework" is what the step time leaves once every torch op is counted. Under --compile the
linears, norms, rotary embedding and activations run inside the compiled graph's own code, which the
profiler sees as one block ("compiled graph"). By default the engine decides (CPU models from 50 M
parameters compile); engines older than the `compile` setting take no --compile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill import LLM, SamplingParams

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("compiled graph (linears, norms, rope, activations)", ("CompiledFxGraph",)),
    ("linear (weights)", ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear", "aten::bmm",
                          "aten::linear")),
    ("attention: SDPA", ("flash_attention", "aten::_scaled_dot_product")),
    ("attention: KV gather / store", ("aten::index", "aten::index_select", "aten::index_copy_", "aten::gather",
                                      "aten::stack")),
    ("GQA repeat", ("aten::repeat_interleave",)),
    ("copies / casts", ("aten::copy_", "aten::_to_copy", "aten::contiguous", "aten::clone")),
    ("sampling", ("aten::exponential_", "aten::argmax", "aten::sort", "aten::softmax")),
    ("norm / rope / activation / adds", ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt",
                                         "aten::cat", "aten::neg", "aten::silu", "aten::div", "rms_norm", "aten::sum",
                                         "aten::cos", "aten::sin", "aten::embedding")),
)
# Wrappers whose self time is bookkeeping around ops counted elsewhere.
_WRAPPERS = ("Torch-Compiled", "TorchDynamo", "Pregraph", "AOTDispatcher", "tokenmill::")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", choices=["on", "off", "default"], default="default",
                        help="default: the engine's own choice (and the only one an engine without the knob has)")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before the measured steps")
    args = parser.parse_args()
    torch.set_num_threads(2)
    extra = {} if args.compile == "default" else {"compile": args.compile == "on"}
    llm = LLM(model=args.model, dtype=args.dtype, num_kv_blocks=512, max_model_len=1024, **extra)
    engine = llm.engine
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": list(range(100, 100 + args.context))}, params)
    for _ in range(10):
        engine.step()
    times = []
    for _ in range(40):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    step_ms = statistics.median(times) * 1e3
    steps = 20
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    totals = {name: 0.0 for name, _ in CATEGORIES}
    other = 0.0
    for event in prof.key_averages():
        if event.key.startswith(_WRAPPERS):
            continue
        name = next((name for name, keys in CATEGORIES if any(k in event.key for k in keys)), None)
        if name is None:
            other += event.self_cpu_time_total
        else:
            totals[name] += event.self_cpu_time_total
    per_step = {name: round(total / steps / 1e3, 2) for name, total in totals.items() if total}
    per_step["other torch ops"] = round(other / steps / 1e3, 2)
    per_step["python and framework (rest of the step)"] = round(step_ms - sum(per_step.values()), 2)
    print(json.dumps({"model": args.model, "dtype": args.dtype, "compile": args.compile,
                      "step_ms": round(step_ms, 2), "ms_per_step": per_step}, indent=1))


if __name__ == "__main__":
    main()
