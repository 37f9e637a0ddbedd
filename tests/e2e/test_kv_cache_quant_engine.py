"""The engine with a quantized KV cache: greedy output independent of chunking, prefix-cache hits,
preemption, batching and speculation (a token's stored codes never depend on the step that wrote them);
prompt logprobs close to the unquantized engine's; more blocks in the same KV memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_perturbed_copy
from tests.e2e.conftest import NUM_NEW_TOKENS, make_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
# gemma2: soft-capped scores and a sliding window on alternate layers; fp8 once, on llama.
CASES = [("llama", "int8"), ("gemma2", "int8"), ("llama", "fp8")]


def llm_for(path: Path, kv_cache_dtype: str, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 160)  # a small pool: allocating the default 2 GiB dominates a short test
    return LLM(model=str(path), dtype="float32", max_model_len=512, kv_cache_dtype=kv_cache_dtype, **kw)


def greedy_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(seed=1)


@pytest.fixture(scope="module")
def baseline(checkpoint_dir, prompts) -> dict[tuple[str, str], list[list[int]]]:
    """Per case: no prefix caching, every prompt in one chunk, a pool that never preempts."""
    return {(family, kv): greedy_ids(llm_for(checkpoint_dir(family), kv, enable_prefix_caching=False,
                                             max_num_batched_tokens=4096), prompts)
            for family, kv in CASES}


@pytest.mark.parametrize(("family", "kv"), CASES)
def test_chunked_prefill_gives_the_same_output(family, kv, checkpoint_dir, prompts, baseline):
    llm = llm_for(checkpoint_dir(family), kv, max_num_batched_tokens=16)
    assert greedy_ids(llm, prompts) == baseline[family, kv]


@pytest.mark.parametrize(("family", "kv"), CASES)
def test_prefix_cache_hits_give_the_same_output(family, kv, checkpoint_dir, prompts, baseline):
    llm = llm_for(checkpoint_dir(family), kv, enable_prefix_caching=True)
    assert greedy_ids(llm, prompts) == baseline[family, kv]
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in again] == baseline[family, kv]
    assert max(o.num_cached_tokens for o in again) >= 288


@pytest.mark.parametrize(("family", "kv"), CASES[:2])
def test_preemption_gives_the_same_output(family, kv, checkpoint_dir, prompts, baseline):
    llm = llm_for(checkpoint_dir(family), kv, num_kv_blocks=32)  # 512 slots for ~1,000 tokens: preempts
    assert greedy_ids(llm, prompts) == baseline[family, kv]
    assert llm.engine.stats()["num_preemptions"] > 0


def test_each_prompt_alone_gives_its_batched_output(checkpoint_dir, prompts, baseline):
    llm = llm_for(checkpoint_dir("llama"), "int8", enable_prefix_caching=False)
    assert [greedy_ids(llm, [p])[0] for p in prompts] == baseline["llama", "int8"]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_gives_the_same_output(method, checkpoint_dir, prompts, baseline, tmp_path_factory):
    target = checkpoint_dir("llama")
    draft = make_perturbed_copy(target, tmp_path_factory.mktemp("near-llama"), relative_noise=0.1, seed=5)
    # Repetitive prompts too, so that prompt lookup finds drafts and some are accepted.
    repetitive = [[11, 12, 13, 14, 15] * n for n in (5, 12)]
    spec = dict(speculative_method=method, num_speculative_tokens=4, speculative_adaptive=False,
                draft_model=str(draft) if method == "draft" else None, draft_confidence_threshold=0.0)
    plain = greedy_ids(llm_for(target, "int8"), repetitive)
    llm = llm_for(target, "int8", **spec)
    assert greedy_ids(llm, prompts + repetitive) == baseline["llama", "int8"] + plain
    assert llm.engine.stats()["spec_num_accepted_tokens"] > 0


def _prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """Logprob of every prompt token after the first, all prompts together."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1, prompt_logprobs=0))
    return torch.tensor([o.prompt_logprobs[i][t].logprob for o, p in zip(outputs, prompts)
                         for i, t in enumerate(p) if i > 0])


@pytest.mark.parametrize(("kv", "per_token", "mean_nll"), [("int8", 0.1, 0.005), ("fp8", 0.5, 0.02)])
def test_prompt_logprobs_stay_close_to_the_unquantized_engine(kv, per_token, mean_nll, checkpoint_dir):
    """Per token within `per_token` nats, perplexity within `mean_nll` relative (int8: 0.5 %)."""
    path = checkpoint_dir("llama")
    prompts = make_prompts(seed=6, lengths=[30, 200])
    reference = _prompt_logprobs(llm_for(path, "auto", num_kv_blocks=64), prompts)
    quantized = _prompt_logprobs(llm_for(path, kv, num_kv_blocks=64), prompts)
    difference = (quantized - reference).abs()
    assert 0 < difference.max().item() < per_token  # the codes are used, and cost little
    assert abs(quantized.mean().item() / reference.mean().item() - 1) < mean_nll


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_prompt_logprobs_do_not_depend_on_chunking(kv, checkpoint_dir):
    """Finer than greedy tokens: a chunk that saw unquantized keys would move logprobs by ~1e-2, not 1e-5."""
    path = checkpoint_dir("llama")
    prompts = make_prompts(seed=6, lengths=[30, 200])
    whole = _prompt_logprobs(llm_for(path, kv, num_kv_blocks=64), prompts)
    chunked = _prompt_logprobs(llm_for(path, kv, num_kv_blocks=64, max_num_batched_tokens=16), prompts)
    assert (whole - chunked).abs().max().item() < 1e-4


def test_int8_kv_holds_more_blocks_in_the_same_memory(checkpoint_dir):
    path = checkpoint_dir("llama")  # head_dim 24, float32: 96 bytes per token and head, int8 24 + 2
    budget_gb = 0.004
    blocks = {kv: llm_for(path, kv, num_kv_blocks=None, kv_cache_memory_gb=budget_gb).engine.stats()["kv_blocks_total"]
              for kv in ("auto", "int8")}
    per_block = {kv: 2 * 16 * 2 * size * 2 for kv, size in (("auto", 96), ("int8", 26))}  # 2 layers, 2 KV heads
    assert blocks == {kv: int(budget_gb * (1 << 30)) // per_block[kv] for kv in blocks}
    assert blocks["int8"] > 3.6 * blocks["auto"]


def test_a_draft_models_kv_is_quantized_too_and_shares_the_budget(checkpoint_dir):
    path = checkpoint_dir("llama")  # its own draft: per block, two models' KV
    llm = llm_for(path, "int8", num_kv_blocks=None, kv_cache_memory_gb=0.004, speculative_method="draft",
                  draft_model=str(path), num_speculative_tokens=2)
    per_model = 2 * 16 * 2 * 26 * 2
    assert llm.engine.stats()["kv_blocks_total"] == int(0.004 * (1 << 30)) // (2 * per_model)
    assert greedy_ids(llm, [[11, 12, 13] * 5]) == greedy_ids(llm_for(path, "int8"), [[11, 12, 13] * 5])


def test_an_unknown_kv_cache_dtype_is_refused_before_loading():
    with pytest.raises(ConfigError) as info:
        LLM(model="/ckpt/target", kv_cache_dtype="int4")
    assert info.value.setting == "kv_cache_dtype" and "auto, int8, fp8" in str(info.value)


def test_the_accuracy_script_compares_kv_dtypes_on_held_out_text(checkpoint_dir, capsys):
    from benchmarks.kv_cache_accuracy import main

    results = main(["--model", str(checkpoint_dir("llama")), "--dtype", "float32", "--tokens", "64", "--windows", "2",
                    "--kv-cache-dtypes", "auto,int8", "--text", "python"])
    assert set(results) == {"auto", "int8"} and results["auto"] != results["int8"]
    assert abs(results["int8"] / results["auto"] - 1) < 0.01
    assert "| int8 |" in capsys.readouterr().out
