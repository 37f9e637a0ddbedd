"""Speculative decoding end to end: greedy output never changes, sampling keeps its distribution."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy.stats import chi2_contingency

from tests.checkpoints import FAMILIES, make_checkpoint, make_perturbed_copy
from tests.e2e.conftest import NUM_NEW_TOKENS, make_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # Half random, half repetitive (where prompt lookup finds matches and drafts get accepted).
    random_prompts = make_prompts(seed=2, lengths=[1, 9, 40, 130])
    return random_prompts + [[11, 12, 13, 14, 15] * n for n in (2, 5, 12, 40)]


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, checkpoint_dir) -> dict[str, Path]:
    """Per family: a near copy of the target (drafts often accepted); one unrelated 1-layer draft."""
    built: dict[str, Path] = {
        family: make_perturbed_copy(checkpoint_dir(family), tmp_path_factory.mktemp(f"near-{family}"),
                                    relative_noise=0.1, seed=5)
        for family in FAMILIES
    }
    built["unrelated"] = make_checkpoint("llama", tmp_path_factory.mktemp("unrelated"), seed=7, num_layers=1)
    return built


def llm_for(path: Path, method: str | None = None, draft: Path | None = None, k: int = 4, **kw) -> LLM:
    spec = {}
    if method is not None:
        spec = dict(speculative_method=method, num_speculative_tokens=k, draft_model=str(draft) if draft else None,
                    speculative_adaptive=False, draft_confidence_threshold=0.0)
    kw.setdefault("num_kv_blocks", 160)  # a small pool: allocating the default 2 GiB dominates a short test
    kw.setdefault("max_model_len", 512)
    return LLM(model=str(path), dtype="float32", **spec, **kw)


def greedy_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def baseline(checkpoint_dir, prompts) -> dict[str, list[list[int]]]:
    return {family: greedy_ids(llm_for(checkpoint_dir(family)), prompts) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_unchanged_by_speculation(family, method, checkpoint_dir, drafts, prompts, baseline):
    llm = llm_for(checkpoint_dir(family), method, drafts[family] if method == "draft" else None)
    assert greedy_ids(llm, prompts) == baseline[family]
    stats = llm.engine.stats()
    assert stats["spec_num_draft_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0
    assert stats["kv_blocks_used"] == 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_unchanged_under_chunking_prefix_hits_and_preemption(
    family, method, checkpoint_dir, drafts, prompts, baseline
):
    draft = drafts[family] if method == "draft" else None
    # A budget of 16 chunks the prompts and trims drafts to what is left of it.
    assert greedy_ids(llm_for(checkpoint_dir(family), method, draft, max_num_batched_tokens=16), prompts) == baseline[family]
    # Prefix hits: the second run finds every prompt in the cache.
    llm = llm_for(checkpoint_dir(family), method, draft)
    greedy_ids(llm, prompts)
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in again] == baseline[family]
    assert max(o.num_cached_tokens for o in again) >= 192
    # A pool too small for all requests: preemption recomputes some of them.
    llm = llm_for(checkpoint_dir(family), method, draft, num_kv_blocks=36)
    assert greedy_ids(llm, prompts) == baseline[family]
    assert llm.engine.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_staggered_arrivals_give_the_same_output(method, checkpoint_dir, drafts, prompts, baseline):
    llm = llm_for(checkpoint_dir("llama"), method, drafts["llama"] if method == "draft" else None)
    engine = llm.engine
    done: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending and engine.num_steps % 3 == 0:
            index, prompt = pending.pop(0)
            engine.add_request(str(index), {"prompt_token_ids": prompt}, GREEDY)
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
        if not engine.has_unfinished_requests() and pending:
            engine.num_steps += 1  # nothing running: let time pass until the next arrival
    assert [done[str(i)] for i in range(len(prompts))] == baseline["llama"]


def test_identical_draft_has_every_token_accepted(checkpoint_dir, prompts, baseline):
    target = checkpoint_dir("llama")
    llm = llm_for(target, "draft", target)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == baseline["llama"]
    for output in outputs:
        spec = output.outputs[0].spec_decoding
        assert spec["acceptance_rate"] == 1.0 and spec["num_draft_tokens"] > 0
        assert spec["per_position_acceptance"] == [1.0] * 4
        assert spec["mean_accepted_length"] > 4.0
    # Sampling: p and q agree to float precision, so (nearly) every draft is accepted.
    sampled = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=3))
    accepted = sum(o.outputs[0].spec_decoding["num_accepted_tokens"] for o in sampled)
    drafted = sum(o.outputs[0].spec_decoding["num_draft_tokens"] for o in sampled)
    assert accepted / drafted > 0.99


def test_unrelated_random_draft_still_gives_exact_output(checkpoint_dir, drafts, prompts, baseline):
    for family in ("llama", "mistral"):
        llm = llm_for(checkpoint_dir(family), "draft", drafts["unrelated"])
        assert greedy_ids(llm, prompts) == baseline[family]
        assert llm.engine.stats()["spec_num_draft_tokens"] > 0


def test_seeded_sampling_with_speculation_is_reproducible(checkpoint_dir, drafts, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=11, ignore_eos=True)
    first = greedy_ids(llm_for(checkpoint_dir("llama"), "draft", drafts["llama"]), prompts[:3], params)
    # The same seed, now batched with other requests: the same tokens.
    llm = llm_for(checkpoint_dir("llama"), "draft", drafts["llama"])
    mixed = llm.generate([{"prompt_token_ids": p} for p in prompts], [params] * 3 + [GREEDY] * 5)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == first


@pytest.mark.parametrize(("temperature", "spec_method", "prompt_ids"), [
    (0.5, "draft", [10, 20, 30, 40, 50]),
    (1.0, "draft", [10, 20, 30, 40, 50]),
    # 48 distinct prompt tokens: a sampled token found among them is drafted by lookup (deterministic
    # drafts), the others by the model (sampled drafts).
    (1.0, "ngram+draft", list(range(10, 58))),
])
def test_sampling_distribution_is_unchanged_by_speculation(temperature, spec_method, prompt_ids, checkpoint_dir,
                                                           drafts, monkeypatch):
    """First three tokens over 20,000 samples each, with and without a draft that differs from the target."""
    num_samples = 20_000
    params = SamplingParams(temperature=temperature, top_p=0.9, max_tokens=4, ignore_eos=True)
    prompt = [{"prompt_token_ids": prompt_ids}] * num_samples
    counts = []
    for method in (None, spec_method):
        llm = llm_for(checkpoint_dir("llama"), method, drafts["llama"], k=2, max_model_len=64)
        model_drafts = Counter()
        if method == "ngram+draft":
            proposer = llm.engine.worker.drafter.proposer
            free, model = proposer.propose_free, proposer.model.propose
            monkeypatch.setattr(proposer, "propose_free",
                                lambda rs, f=free, c=model_drafts: _count(c, "lookup", f(rs)))
            monkeypatch.setattr(proposer.model, "propose",
                                lambda rs, m=model, c=model_drafts: _count(c, "model", m(rs)))
        outputs = llm.generate(prompt, params)
        if method == "ngram+draft":
            assert model_drafts["lookup"] > 500 and model_drafts["model"] > 5000, model_drafts
        counts.append([Counter(o.outputs[0].token_ids[pos] for o in outputs) for pos in range(3)])
        if method:
            stats = llm.engine.stats()
            # Drafts for tokens 2 and 3, with some accepted and some rejected.
            assert stats["spec_num_verify_steps"] >= num_samples
            assert 0.05 < stats["spec_acceptance_rate"] < 0.95
    for pos in range(3):
        plain, spec = counts[0][pos], counts[1][pos]
        tokens = sorted(set(plain) | set(spec))
        common = [t for t in tokens if plain[t] + spec[t] >= 10]
        rare = [t for t in tokens if plain[t] + spec[t] < 10]
        table = [[plain[t] for t in common] + [sum(plain[t] for t in rare)],
                 [spec[t] for t in common] + [sum(spec[t] for t in rare)]]
        if not rare:
            table = [row[:-1] for row in table]
        assert chi2_contingency(table).pvalue > 0.01, f"position {pos}"


def _count(counter: Counter, source: str, drafts: list) -> list:
    counter[source] += sum(1 for draft in drafts if draft is not None and draft.token_ids)
    return drafts


def test_adaptive_drafting_reports_metrics_and_keeps_output(checkpoint_dir, drafts, prompts, baseline):
    llm = LLM(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=512,
              speculative_method="ngram", speculative_adaptive=True)
    assert greedy_ids(llm, prompts) == baseline["llama"]
    speculator = llm.engine.worker.drafter
    assert speculator.target_times.points  # step times were measured at start-up
    assert 0 <= speculator.last_batch_cap <= 4


def test_bad_speculative_config_is_rejected(checkpoint_dir):
    path = str(checkpoint_dir("llama"))
    with pytest.raises(ConfigError, match="speculative_method"):
        LLM(model=path, speculative_method="medusa")
    with pytest.raises(ConfigError, match="draft_model"):
        LLM(model=path, speculative_method="draft")
    with pytest.raises(ConfigError, match="draft_model"):
        LLM(model=path, speculative_method="ngram+draft")
    with pytest.raises(ConfigError, match="draft_dtype"):
        LLM(model=path, speculative_method="draft", draft_model=path, draft_dtype="int8")
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        LLM(model=path, speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="draft_confidence_threshold"):
        LLM(model=path, speculative_method="draft", draft_model=path, draft_confidence_threshold=1.5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lookup_then_draft_uses_both_and_keeps_greedy_output(family, checkpoint_dir, drafts, prompts, baseline,
                                                             monkeypatch):
    llm = llm_for(checkpoint_dir(family), "ngram+draft", drafts[family], draft_dtype="bfloat16")
    proposer = llm.engine.worker.drafter.proposer
    assert next(proposer.model.model.parameters()).dtype == torch.bfloat16
    sources = Counter()
    lookup, model = proposer.propose_free, proposer.model.propose

    def counting_lookup(requests):
        found = lookup(requests)
        sources["lookup"] += sum(1 for draft in found if draft is not None)
        return found

    def counting_model(requests):
        sources["model"] += len(requests)
        return model(requests)

    monkeypatch.setattr(proposer, "propose_free", counting_lookup)
    monkeypatch.setattr(proposer.model, "propose", counting_model)
    assert greedy_ids(llm, prompts) == baseline[family]
    # The repetitive prompts are drafted by lookup; the random ones, where lookup finds nothing, by the model.
    assert sources["lookup"] > 0 and sources["model"] > 0
    assert llm.engine.stats()["kv_blocks_used"] == 0
    # Chunked prefill and preemption change nothing either.
    chunked = llm_for(checkpoint_dir(family), "ngram+draft", drafts[family], max_num_batched_tokens=16)
    assert greedy_ids(chunked, prompts) == baseline[family]
    small = llm_for(checkpoint_dir(family), "ngram+draft", drafts[family], num_kv_blocks=36)
    assert greedy_ids(small, prompts) == baseline[family]
    assert small.engine.stats()["num_preemptions"] > 0
