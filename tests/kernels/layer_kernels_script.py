"""Greedy tokens of the engine with every Triton kernel on (norm, rotary, activation in the layers as on CUDA,
and the triton attention backend) against the plain torch engine, float32 on the CPU, printed as JSON: run
under TRITON_INTERPRET=1 by test_engine_triton_backend.py.

The layers take their Triton path only for CUDA tensors; here that test is replaced by one that always says
yes, so the layers' calls (views of the fused qkv, q/k norms on [T, heads, head_dim], partial rotary, Gemma's
offset norm and GeGLU) run through the kernels under the interpreter.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from tests.checkpoints import make_checkpoint
from tokenmill import LLM, SamplingParams
from tokenmill.layers import activation, norm, rotary

LAYER_MODULES = (activation, norm, rotary)
PROMPTS = [[(7 * i + 3) % 500 + 8 for i in range(n)] for n in (13, 4)]


def greedy(path: Path, backend: str) -> list[list[int]]:
    llm = LLM(model=str(path), dtype="float32", max_model_len=64, num_kv_blocks=16, attention_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    originals = {module: module.use_triton_kernels for module in LAYER_MODULES}
    with tempfile.TemporaryDirectory() as folder:
        for family in sys.argv[1:]:
            path = make_checkpoint(family, Path(folder) / family)
            plain = greedy(path, "torch")
            calls = {"count": 0}

            def always(x: torch.Tensor) -> bool:
                calls["count"] += 1
                return True

            for module in LAYER_MODULES:
                module.use_triton_kernels = always
            try:
                results[family] = {"torch": plain, "triton": greedy(path, "triton"), "layer_calls": calls["count"]}
            finally:
                for module, original in originals.items():
                    module.use_triton_kernels = original
    print(json.dumps(results))


if __name__ == "__main__":
    main()
