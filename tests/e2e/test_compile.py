"""torch.compile of the model forward: the same greedy tokens as eager, and the default policy."""

from __future__ import annotations

import torch

from tests.checkpoints import make_checkpoint
from tokenmill import LLM, SamplingParams
from tokenmill.platform import COMPILE_MIN_PARAMS_CPU, default_compile


def test_compiled_forward_generates_what_eager_generates(tmp_path) -> None:
    """Prefill chunks, one decode (its own static graph) and batched decodes (the dynamic graph)."""
    path = str(make_checkpoint("qwen2", tmp_path / "qwen2"))
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (37, 5, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    eager = LLM(model=path, dtype="float32", num_kv_blocks=256, compile=False)
    compiled = LLM(model=path, dtype="float32", num_kv_blocks=256, compile=True, max_num_batched_tokens=64)
    assert compiled.engine.worker.compile and compiled.engine.worker.compile_seconds > 0
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in compiled.generate(prompts, params)] == expected
    alone = compiled.generate(prompts[1], params)[0].outputs[0].token_ids  # batch-1 decode
    assert alone == expected[1]


def test_compile_is_on_by_default_only_where_it_measured_faster() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_compile(cpu, COMPILE_MIN_PARAMS_CPU)
    assert not default_compile(cpu, COMPILE_MIN_PARAMS_CPU - 1)  # small models: the compile would not pay
    assert not default_compile(cuda, 10 * COMPILE_MIN_PARAMS_CPU)
