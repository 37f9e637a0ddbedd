"""A step of many requests runs each expert at most once per MoE layer: expert matmuls per step are bounded by
the number of experts, whatever the number of tokens (the engine never loops over tokens per expert)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import make_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.layers.moe import FusedExperts


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_matmuls_per_step_are_bounded_by_the_experts_at_batch_32(family, checkpoint_dir):
    llm = LLM(model=str(checkpoint_dir(family)), dtype="float32", max_model_len=512)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, FusedExperts)]
    assert layers
    forwards: list[tuple[int, int, int]] = []  # (tokens, token-expert pairs, expert matmuls) per layer forward

    def before(module: FusedExperts, args: tuple) -> None:
        module.calls_before = module.expert_calls

    def after(module: FusedExperts, args: tuple, output: object) -> None:
        hidden, _, ids = args
        forwards.append((hidden.shape[0], ids.numel(), module.expert_calls - module.calls_before))

    for layer in layers:
        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)
    prompts = make_prompts(lengths=[3 + i % 13 for i in range(32)], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outputs)

    num_experts = layers[0].num_experts
    assert forwards and all(calls <= num_experts for _, _, calls in forwards)
    decode_of_32 = [(pairs, calls) for tokens, pairs, calls in forwards if tokens == 32]
    assert decode_of_32, "the 32 requests decode together in one step"
    assert all(pairs == 32 * 2 > num_experts >= calls for pairs, calls in decode_of_32)
    assert max(tokens for tokens, _, _ in forwards) > 32  # prefill steps too: more tokens, no more matmuls
