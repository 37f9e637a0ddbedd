"""`tokenmill distill`: KL falls, the draft checkpoint is standard, acceptance measurement is right."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.test_train import TINY, cli, write_toy_corpus
from tokenmill_train.checkpoint_io import load_hf_model
from tokenmill_train.distill import kd_loss, measure_acceptance, speculate_greedy

DISTILL_STEPS = 30


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    corpus = write_toy_corpus(root / "corpus")
    target = root / "target"
    cli(["train", "--data", str(corpus), "--out", str(target), "--max-steps", "40", "--save-every", "0", *TINY])
    draft = root / "draft"
    log = cli(["distill", "--target", str(target), "--data", str(corpus), "--out", str(draft),
               "--hidden-size", "64", "--layers", "1", "--context-length", "64", "--temperature", "2.0",
               "--self-gen-fraction", "0.5", "--gen-temperature", "0.8", "--max-steps", str(DISTILL_STEPS),
               "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5", "--eval-every", "10",
               "--holdout-fraction", "0.1", "--device", "cpu", "--acceptance-prompts", "4",
               "--acceptance-prompt-length", "16", "--acceptance-new-tokens", "16"])
    summary = json.loads((draft / "distill_summary.json").read_text())
    return {"target": target, "draft": draft, "log": log, "summary": summary, "corpus": corpus}


def corpus_prompts(pair: dict, n: int = 4, length: int = 16) -> list[list[int]]:
    """In-distribution prompts: the first tokens of corpus files (out-of-distribution prompts such as
    range(30, 46) make a tiny target repeat one token, which even a random tied-embedding draft predicts)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pair["target"] / "tokenizer.json"))
    files = sorted((pair["corpus"] / "pkg").glob("*.py"))[:n]
    return [tok.encode(f.read_text()).ids[:length] for f in files]


def test_kd_loss_is_kl_of_target_from_draft() -> None:
    g = torch.Generator().manual_seed(0)
    d, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert kd_loss(t, t, 1.0).abs().item() < 1e-6
    p_t, log_p_d = torch.softmax(t / 2, -1), torch.log_softmax(d / 2, -1)
    manual = (p_t * (p_t.log() - log_p_d)).sum(-1).mean() * 4  # KL(p_target || p_draft) · T²
    assert torch.allclose(kd_loss(d, t, 2.0), manual, atol=1e-6)


def test_distillation_lowers_heldout_kl(pair: dict) -> None:
    s = pair["summary"]
    kls = [e["heldout_kl"] for e in s["evals"]]
    assert [e["step"] for e in s["evals"]] == [0, 10, 20, DISTILL_STEPS]
    assert kls[-1] < 0.6 * kls[0]
    assert s["final_heldout_kl"] == kls[-1] and s["initial_heldout_kl"] == kls[0]
    assert 0 < s["self_gen_steps"] < DISTILL_STEPS  # about half the batches were the target's own text
    assert len(s["loss_history"]) == DISTILL_STEPS


def test_draft_checkpoint_is_standard_and_shares_the_tokenizer(pair: dict) -> None:
    from transformers import AutoModelForCausalLM

    target, draft = pair["target"], pair["draft"]
    assert (draft / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()
    assert (draft / "tokenizer_config.json").read_bytes() == (target / "tokenizer_config.json").read_bytes()
    dcfg = json.loads((draft / "config.json").read_text())
    tcfg = json.loads((target / "config.json").read_text())
    assert dcfg["num_hidden_layers"] == 1 and dcfg["vocab_size"] == tcfg["vocab_size"]
    assert dcfg["eos_token_id"] == tcfg["eos_token_id"] and dcfg["bos_token_id"] == tcfg["bos_token_id"]
    ids = torch.randint(0, dcfg["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, load_hf_model(draft).eval()(ids), atol=1e-4, rtol=0)


def test_identical_draft_is_always_accepted(pair: dict) -> None:
    target, copy = load_hf_model(pair["target"]), load_hf_model(pair["target"])
    prompts = corpus_prompts(pair, n=2) + [list(range(100, 120))]
    acc = measure_acceptance(target, copy, prompts, k=4)
    assert acc["acceptance_rate"] == 1.0 and acc["mean_accepted_tokens"] == 4.0
    assert acc["tokens_per_verify_step"] == 5.0
    assert acc["per_position_acceptance"] == [1.0] * 4 and acc["conditional_acceptance"] == [1.0] * 4


def test_distilled_draft_acceptance_is_sane_and_speculation_is_exact(pair: dict) -> None:
    target, draft = load_hf_model(pair["target"]), load_hf_model(pair["draft"])
    prompt = corpus_prompts(pair, n=1)[0]
    out, accepted = speculate_greedy(target, draft, prompt, k=4, max_new_tokens=24)
    ref = target.generate(torch.tensor([prompt]), len(out))[0, len(prompt):].tolist()
    assert out == ref  # greedy speculation must reproduce the target's own greedy output
    assert all(0 <= a <= 4 for a in accepted)
    assert len(out) == sum(a + 1 for a in accepted)

    acc = pair["summary"]["acceptance"]
    assert acc["k"] == 4 and acc["verify_steps"] > 0 and acc["sequences"] == 4
    per_pos = acc["per_position_acceptance"]
    assert all(0.0 <= p <= 1.0 for p in per_pos)
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))  # accepting token i+1 requires token i
    assert abs(acc["mean_accepted_tokens"] - sum(per_pos)) < 1e-9  # E[a] = Σ_i P(a > i)
    assert acc["tokens_per_verify_step"] == acc["mean_accepted_tokens"] + 1
    assert acc["mean_accepted_tokens"] > 0.5  # trained on this target's distribution; random drafts get ~0
    assert "accepted tokens per verify step" in pair["log"]


def test_untrained_draft_accepts_less_than_distilled(pair: dict) -> None:
    from tokenmill_train.model import LlamaForCausalLM

    target, distilled = load_hf_model(pair["target"]), load_hf_model(pair["draft"])
    torch.manual_seed(0)
    random_draft = LlamaForCausalLM(distilled.config)
    prompts = corpus_prompts(pair)
    assert (measure_acceptance(target, random_draft, prompts)["mean_accepted_tokens"]
            < measure_acceptance(target, distilled, prompts)["mean_accepted_tokens"])


def test_draft_starts_as_the_target_with_middle_layers_skipped(pair: dict) -> None:
    from tokenmill_train.distill import init_draft_from_target, spread_layers
    from tokenmill_train.model import LlamaForCausalLM, ModelConfig

    assert spread_layers(1, 8) == [0] and spread_layers(2, 8) == [0, 7] and spread_layers(3, 5) == [0, 2, 4]
    target = load_hf_model(pair["target"])
    fields = {k: getattr(target.config, k) for k in ModelConfig.__dataclass_fields__}
    same_shape = LlamaForCausalLM(ModelConfig(**{**fields, "num_hidden_layers": 2}))
    with torch.no_grad():
        described = init_draft_from_target(same_shape, target)
    last = len(target.model.layers) - 1
    assert described == f"embeddings and target layers [0, {last}]"
    for draft_layer, target_layer in zip(same_shape.model.layers, [target.model.layers[0], target.model.layers[last]]):
        for (name, a), b in zip(draft_layer.state_dict().items(), target_layer.state_dict().values()):
            assert torch.equal(a, b), name
    narrower_mlp = LlamaForCausalLM(ModelConfig(**{**fields, "num_hidden_layers": 1,
                                                    "intermediate_size": fields["intermediate_size"] // 2}))
    with torch.no_grad():
        assert init_draft_from_target(narrower_mlp, target) == "embeddings"


def test_init_draft_continues_from_an_earlier_distillation(pair: dict, tmp_path) -> None:
    out = tmp_path / "continued"
    log = cli(["distill", "--target", str(pair["target"]), "--init-draft", str(pair["draft"]),
               "--data", str(pair["corpus"]), "--out", str(out), "--hidden-size", "64", "--layers", "1",
               "--context-length", "64", "--max-steps", "1", "--batch-size", "8", "--eval-every", "0",
               "--holdout-fraction", "0.1", "--device", "cpu", "--acceptance-prompts", "2",
               "--acceptance-prompt-length", "16", "--acceptance-new-tokens", "4"])
    summary = json.loads((out / "distill_summary.json").read_text())
    assert "continued from" in log
    # It starts where the first run ended, not from the target's layers.
    assert summary["initial_heldout_kl"] == pytest.approx(pair["summary"]["final_heldout_kl"], rel=1e-4)
