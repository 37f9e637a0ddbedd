"""Prefix cache, chunked prefill, preemption and staggered arrivals never change greedy output."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import NUM_NEW_TOKENS, make_prompts
from tokenmill import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
FAMILIES_HERE = ["llama", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe"]


def greedy_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(seed=1)


@pytest.fixture(scope="module")
def baseline(checkpoint_dir, prompts):
    """Reference output: no prefix caching, unlimited budget, ample pool."""
    return {
        family: greedy_ids(
            LLM(model=str(checkpoint_dir(family)), dtype="float32", max_model_len=512, enable_prefix_caching=False,
                max_num_batched_tokens=4096),
            prompts,
        )
        for family in FAMILIES_HERE
    }


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_prefix_caching_on_gives_the_same_output(family, checkpoint_dir, prompts, baseline):
    llm = LLM(model=str(checkpoint_dir(family)), dtype="float32", max_model_len=512, enable_prefix_caching=True)
    assert greedy_ids(llm, prompts) == baseline[family]
    # Run again: now every prompt hits the cache and the output must still be the same.
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in again] == baseline[family]
    assert max(o.num_cached_tokens for o in again) >= 288


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_token_budget_of_16_gives_the_same_output(family, checkpoint_dir, prompts, baseline):
    llm = LLM(model=str(checkpoint_dir(family)), dtype="float32", max_model_len=512, max_num_batched_tokens=16)
    assert greedy_ids(llm, prompts) == baseline[family]


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_preemption_gives_the_same_output(family, checkpoint_dir, prompts, baseline):
    # 32 blocks x 16 = 512 token slots for 8 requests that need ~1,000: preemption must happen.
    llm = LLM(model=str(checkpoint_dir(family)), dtype="float32", max_model_len=512, num_kv_blocks=32)
    assert greedy_ids(llm, prompts) == baseline[family]
    assert llm.engine.stats()["num_preemptions"] > 0
    assert llm.engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_staggered_arrivals_give_the_same_output(family, checkpoint_dir, prompts, baseline):
    llm = LLM(model=str(checkpoint_dir(family)), dtype="float32", max_model_len=512, max_num_batched_tokens=64)
    engine = llm.engine
    finished: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # one new request every third step
            index, prompt = pending.pop(0)
            engine.add_request(f"r{index}", {"prompt_token_ids": prompt}, GREEDY)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        step += 1
    assert [finished[f"r{i}"] for i in range(len(prompts))] == baseline[family]


def test_shared_200_token_prefix_hits_the_cache(checkpoint_dir):
    path = str(checkpoint_dir("llama"))
    prefix = make_prompts(lengths=[200], seed=5)[0]
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24]
    cached = LLM(model=path, dtype="float32", max_model_len=512)
    cached.generate({"prompt_token_ids": first}, GREEDY)
    hit = cached.generate({"prompt_token_ids": second}, GREEDY)[0]
    assert hit.num_cached_tokens >= 192
    uncached = LLM(model=path, dtype="float32", max_model_len=512, enable_prefix_caching=False)
    miss = uncached.generate({"prompt_token_ids": second}, GREEDY)[0]
    assert miss.num_cached_tokens == 0
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
