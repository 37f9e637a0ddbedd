"""`tokenmill distill --method eagle`: a few steps lower the loss, the head folder loads in the engine and its
drafts keep greedy output exact, the twin computes what the engine's head computes, acceptance is measured."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_train import TINY, cli, write_toy_corpus
from tokenmill import LLM, SamplingParams
from tokenmill.attention.metadata import build_attention_metadata, forward_context
from tokenmill.spec_decode.eagle_head import EagleHeadConfig
from tokenmill_train.checkpoint_io import load_hf_model
from tokenmill_train.eagle_distill import frequent_tokens
from tokenmill_train.eagle_model import EagleHeadModel, shifted_hidden

STEPS = 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eagle")
    corpus = write_toy_corpus(root / "corpus")
    target = root / "target"
    cli(["train", "--data", str(corpus), "--out", str(target), "--max-steps", "40", "--save-every", "0", *TINY])
    head = root / "head"
    log = cli(["distill", "--method", "eagle", "--target", str(target), "--data", str(corpus), "--out", str(head),
               "--context-length", "64", "--max-steps", str(STEPS), "--batch-size", "8", "--lr", "3e-3",
               "--warmup-steps", "5", "--eval-every", "10", "--holdout-fraction", "0.1", "--device", "cpu",
               "--draft-vocab-size", "200", "--acceptance-prompts", "4", "--acceptance-prompt-length", "16",
               "--acceptance-new-tokens", "16"])
    summary = json.loads((head / "distill_summary.json").read_text())
    return {"target": target, "head": head, "log": log, "summary": summary}


def test_a_few_steps_lower_the_heldout_loss_with_progress_printed(trained: dict) -> None:
    summary, log = trained["summary"], trained["log"]
    assert summary["final_heldout_loss"] < 0.8 * summary["initial_heldout_loss"]
    assert f"step {STEPS}/{STEPS} | loss" in log and "held-out acceptance" in log
    history = summary["loss_history"]
    assert sum(h["loss"] for h in history[-5:]) < sum(h["loss"] for h in history[:5])
    acceptance = summary["acceptance"]
    assert acceptance["verify_steps"] > 0 and 1.0 <= acceptance["mean_accepted_length"] <= 5.0


def test_the_head_folder_loads_and_greedy_output_stays_exact(trained: dict) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(20, 20 + n))} for n in (3, 17, 40)]
    plain = LLM(model=str(trained["target"]), dtype="float32", num_kv_blocks=64).generate(prompts, params)
    llm = LLM(model=str(trained["target"]), dtype="float32", num_kv_blocks=64, speculative_method="eagle",
              draft_model=str(trained["head"]), speculative_adaptive=False, draft_confidence_threshold=0.0)
    drafted = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in drafted] == [o.outputs[0].token_ids for o in plain]
    stats = llm.engine.stats()
    assert stats["spec_num_draft_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0
    d2t = load_file(str(trained["head"] / "model.safetensors"))["d2t"]
    assert len(d2t) == 200 and llm.engine.worker.drafter.proposer.head.draft_to_target.tolist() == d2t.tolist()


def test_the_trainable_twin_computes_the_engines_head(trained: dict) -> None:
    """Same weights, same tokens and target features: the engine's paged head gives the twin's features."""
    llm = LLM(model=str(trained["target"]), dtype="float32", num_kv_blocks=64, speculative_method="eagle",
              draft_model=str(trained["head"]))
    engine_head = llm.engine.worker.drafter.proposer.head
    twin = EagleHeadModel(EagleHeadConfig.read(trained["head"]))
    twin.load_state_dict({k: v for k, v in load_file(str(trained["head"] / "model.safetensors")).items()
                          if k != "d2t"})
    target = load_hf_model(trained["target"]).eval()
    tokens = torch.arange(30, 50)
    with torch.no_grad():
        hidden = target.hidden_states(tokens[None])
        expected = twin.eval()(shifted_hidden(hidden), target.model.embed_tokens(tokens[None]))[0]
        metadata = build_attention_metadata([0], [len(tokens)], [[0, 1]], 16, torch.device("cpu"))
        with forward_context(metadata):
            got = engine_head(tokens, torch.arange(len(tokens)), shifted_hidden(hidden)[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_frequent_tokens_are_the_most_common_ids_ties_by_id() -> None:
    rows = torch.tensor([[5, 5, 5, 2, 2, 9], [9, 9, 7, 1, 1, 1]])
    assert frequent_tokens(rows, 10, 3).tolist() == [1, 5, 9]
    assert frequent_tokens(rows, 10, 4).tolist() == [1, 2, 5, 9]


def test_bad_eagle_distill_arguments_are_refused(trained: dict, tmp_path) -> None:
    from tokenmill.errors import TokenmillError

    with pytest.raises(TokenmillError, match="--draft-vocab-size"):
        cli(["distill", "--method", "eagle", "--target", str(trained["target"]), "--data", "x", "--out",
             str(tmp_path), "--draft-vocab-size", "0"])
