"""EAGLE-style draft heads end to end: greedy output never changes, drafts are the trainable twin's, sampling
keeps its distribution, and bad head folders are refused naming the field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chi2_contingency

from tests.e2e.conftest import NUM_NEW_TOKENS, make_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError
from tokenmill.models.arch_config import read_arch_config
from tokenmill.spec_decode.eagle_head import EagleHeadConfig
from tokenmill_train.checkpoint_io import load_hf_model
from tokenmill_train.eagle_model import EagleHeadModel, draft_chain, save_head

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
HEAD_FAMILIES = ["llama", "qwen3", "gemma2", "mixtral"]


def random_head(target: Path, out: Path, seed: int = 0, draft_vocab: torch.Tensor | None = None) -> Path:
    arch = read_arch_config(target)
    config = EagleHeadConfig(hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
                             num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                             intermediate_size=arch.intermediate_size, target_vocab_size=arch.vocab_size,
                             rope_theta=arch.rope_theta,
                             draft_vocab_size=None if draft_vocab is None else len(draft_vocab))
    torch.manual_seed(seed)
    return save_head(EagleHeadModel(config, initializer_range=0.15), out, draft_vocab)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(seed=4, lengths=[1, 9, 40, 130]) + [[11, 12, 13, 14, 15] * n for n in (2, 12)]


@pytest.fixture(scope="module")
def heads(tmp_path_factory, checkpoint_dir) -> dict[str, Path]:
    return {family: random_head(checkpoint_dir(family), tmp_path_factory.mktemp(f"head-{family}"))
            for family in HEAD_FAMILIES}


def llm_for(path: Path, head: Path | None = None, k: int = 4, **kw) -> LLM:
    spec = {}
    if head is not None:
        spec = dict(speculative_method="eagle", num_speculative_tokens=k, draft_model=str(head),
                    speculative_adaptive=False, draft_confidence_threshold=0.0)
    kw.setdefault("num_kv_blocks", 160)
    kw.setdefault("max_model_len", 512)
    return LLM(model=str(path), dtype="float32", **spec, **kw)


def greedy_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def baseline(checkpoint_dir, prompts) -> dict[str, list[list[int]]]:
    return {family: greedy_ids(llm_for(checkpoint_dir(family)), prompts) for family in HEAD_FAMILIES}


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_greedy_output_is_unchanged_by_head_drafting(family, checkpoint_dir, heads, prompts, baseline):
    llm = llm_for(checkpoint_dir(family), heads[family])
    assert greedy_ids(llm, prompts) == baseline[family]
    stats = llm.engine.stats()
    assert stats["spec_num_draft_tokens"] > 0
    assert stats["kv_blocks_used"] == 0


def test_greedy_output_is_unchanged_under_chunking_prefix_hits_and_preemption(checkpoint_dir, heads, prompts,
                                                                               baseline):
    target, head = checkpoint_dir("llama"), heads["llama"]
    assert greedy_ids(llm_for(target, head, max_num_batched_tokens=16), prompts) == baseline["llama"]
    llm = llm_for(target, head)
    greedy_ids(llm, prompts)
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in again] == baseline["llama"]
    assert max(o.num_cached_tokens for o in again) >= 128
    llm = llm_for(target, head, num_kv_blocks=36)
    assert greedy_ids(llm, prompts) == baseline["llama"]
    assert llm.engine.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("setting", [{}, {"max_num_batched_tokens": 16}, {"prefix_hits": True}, {"num_kv_blocks": 36}])
def test_drafts_are_the_trainable_twins_from_the_target_features(setting, checkpoint_dir, heads, prompts,
                                                                monkeypatch):
    """The hidden states handed over in every kind of step give the head exactly the target features the
    training twin computes from the whole text: the engine's drafts are the twin's."""
    target_dir, head_dir = checkpoint_dir("llama"), heads["llama"]
    setting = dict(setting)
    prefix_hits = setting.pop("prefix_hits", False)
    llm = llm_for(target_dir, head_dir, **setting)
    if prefix_hits:
        greedy_ids(llm, prompts)
    proposer = llm.engine.worker.drafter.proposer
    recorded: list[tuple[list[int], list[int]]] = []
    propose = proposer.propose

    def recording(requests):
        drafts = propose(requests)
        recorded.extend((list(r.token_ids), d.token_ids) for r, d in zip(requests, drafts) if d.token_ids)
        return drafts

    monkeypatch.setattr(proposer, "propose", recording)
    greedy_ids(llm, prompts)
    twin_target = load_hf_model(target_dir).eval()
    twin = EagleHeadModel(EagleHeadConfig.read(head_dir))
    twin.load_state_dict(load_file(str(head_dir / "model.safetensors")))
    twin.eval()
    same = 0
    for token_ids, drafts in recorded:
        tokens = torch.tensor(token_ids)
        with torch.no_grad():
            hidden = twin_target.hidden_states(tokens[None])[0]
        same += draft_chain(twin, twin_target, tokens, hidden, len(token_ids) - 1, len(drafts), None) == drafts
    assert len(recorded) > 50
    assert same >= 0.97 * len(recorded), f"{same} of {len(recorded)} draft chains agree"


def test_reduced_draft_vocabulary_drafts_only_its_tokens(checkpoint_dir, tmp_path, prompts, baseline):
    vocab = torch.randperm(512, generator=torch.Generator().manual_seed(1))[:64]
    head = random_head(checkpoint_dir("llama"), tmp_path / "head", draft_vocab=vocab)
    llm = llm_for(checkpoint_dir("llama"), head)
    proposer = llm.engine.worker.drafter.proposer
    seen: set[int] = set()
    propose = proposer.propose
    proposer.propose = lambda rs: [seen.update(d.token_ids) or d for d in propose(rs)]
    assert greedy_ids(llm, prompts) == baseline["llama"]
    assert seen and seen <= set(vocab.tolist())
    assert proposer.head.draft_lm_head.weight.shape == (64, 64)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_sampling_distribution_is_unchanged_by_head_drafting(temperature, checkpoint_dir, heads):
    """First three tokens over 20,000 samples each, with and without head drafts (top_p 0.9)."""
    num_samples = 20_000
    params = SamplingParams(temperature=temperature, top_p=0.9, max_tokens=4, ignore_eos=True)
    prompt = [{"prompt_token_ids": [10, 20, 30, 40, 50]}] * num_samples
    counts = []
    for head in (None, heads["llama"]):
        llm = llm_for(checkpoint_dir("llama"), head, k=2, max_model_len=64)
        outputs = llm.generate(prompt, params)
        counts.append([Counter(o.outputs[0].token_ids[pos] for o in outputs) for pos in range(3)])
        if head is not None:
            stats = llm.engine.stats()
            assert stats["spec_num_verify_steps"] >= num_samples
            assert 0.01 < stats["spec_acceptance_rate"] < 0.95
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


def _edited_copy(head: Path, out: Path, config: dict | None = None, tensors: dict | None = None,
                 drop: str | None = None) -> Path:
    out.mkdir()
    raw = json.loads((head / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, **(config or {})}))
    weights = load_file(str(head / "model.safetensors"))
    weights.update(tensors or {})
    weights.pop(drop, None)
    save_file(weights, str(out / "model.safetensors"))
    return out


def test_bad_head_folders_are_refused_naming_the_field(checkpoint_dir, heads, tmp_path):
    target, head = str(checkpoint_dir("llama")), heads["llama"]

    def refused(folder: Path | str, *patterns: str) -> None:
        with pytest.raises(ConfigError) as info:
            LLM(model=target, speculative_method="eagle", draft_model=str(folder), num_kv_blocks=64)
        for pattern in ("draft_model", *patterns):
            assert pattern in str(info.value), str(info.value)

    with pytest.raises(ConfigError, match="draft_model"):
        LLM(model=target, speculative_method="eagle")
    refused(tmp_path, "no config.json")
    refused(_edited_copy(head, tmp_path / "vocab", config={"target_vocab_size": 1000}), "target_vocab_size is 1000")
    refused(_edited_copy(head, tmp_path / "wide", config={"hidden_size": 96}), "hidden_size is 96", "64")
    refused(_edited_copy(head, tmp_path / "arch", config={"architecture": "Medusa"}), "architecture")
    refused(_edited_copy(head, tmp_path / "shape", tensors={"fc.weight": torch.zeros(64, 100)}), "fc.weight",
            "(64, 100)")
    refused(_edited_copy(head, tmp_path / "missing", drop="layers.0.mlp.down_proj.weight"), "down_proj")
    refused(_edited_copy(head, tmp_path / "d2t", config={"draft_vocab_size": 4},
                         tensors={"d2t": torch.tensor([1, 2, 3, 999])}), "d2t", "[0, 512)")
    refused(_edited_copy(head, tmp_path / "d2t-alone", tensors={"d2t": torch.tensor([1, 2, 3])}), "draft_vocab_size")
