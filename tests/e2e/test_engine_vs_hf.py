"""The engine generates exactly what transformers generates, for every family, many requests at once."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import FAMILIES
from tests.e2e.conftest import NUM_NEW_TOKENS, hf_greedy, hf_last_logits, make_prompts
from tokenmill import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, min_tokens=NUM_NEW_TOKENS, logprobs=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_transformers(family, checkpoint_dir):
    path = checkpoint_dir(family)
    prompts = make_prompts()
    llm = LLM(model=str(path), dtype="float32", max_model_len=512)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    expected = hf_greedy(path, prompts)
    for prompt, output, reference in zip(prompts, outputs, expected):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)} tokens differs"
        assert output.outputs[0].finish_reason == "length"

    # Last-position logits: the logprob of the first generated token, and its rank, match transformers.
    for prompt, output, logits in zip(prompts, outputs, hf_last_logits(path, prompts)):
        reference = torch.log_softmax(logits, dim=-1)
        first = output.outputs[0].logprobs[0]
        token_id = output.outputs[0].token_ids[0]
        assert first[token_id].rank == 1
        assert first[token_id].logprob == pytest.approx(reference[token_id].item(), rel=1e-4, abs=1e-5)


def test_engine_logits_match_transformers_within_1e4(checkpoint_dir):
    """Full last-position distributions (top 20 logprobs) agree with transformers."""
    path = checkpoint_dir("llama")
    prompts = make_prompts(lengths=[5, 77, 300])
    llm = LLM(model=str(path), dtype="float32", max_model_len=512)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=1, logprobs=20))
    for output, logits in zip(outputs, hf_last_logits(path, prompts)):
        reference = torch.log_softmax(logits, dim=-1)
        top = output.outputs[0].logprobs[0]
        assert len(top) == 20
        for token_id, entry in top.items():
            assert entry.logprob == pytest.approx(reference[token_id].item(), rel=1e-4, abs=1e-5)
        expected_top = torch.topk(reference, 20).indices.tolist()
        assert sorted(top) == sorted(expected_top)
