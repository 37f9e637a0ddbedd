"""A GGUF file alone runs in the engine exactly as transformers runs the same file: greedy tokens, logprobs,
and the tokenizer (encode, decode, chat prompt ids), for llama (q/k permuted, sentencepiece vocabulary),
qwen2 (biases) and qwen3 (q/k norms), with float and quantized weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import greedy_tokens
from tests.e2e.conftest import make_prompts
from tests.unit.test_tokenizer import CONVERSATIONS, TEXTS
from tokenmill import LLM, SamplingParams
from tokenmill.engine.tokenizer import Tokenizer

pytest.importorskip("gguf")
from tests.gguf_files import DEQUANTIZED, make_gguf  # noqa: E402

NEW_TOKENS = 24
# family -> (ggml type of the matrices, tokenizer kind, config overrides)
CASES = {
    "llama": ("Q8_0", "llama", {}),
    "qwen2": ("F32", "gpt2", {}),
    # transformers reads no head_dim from a qwen3 GGUF and takes Qwen3Config's 128; the file must agree.
    "qwen3": ("Q4_1", "gpt2", {"head_dim": 128}),
}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            tensor_type, tokenizer, overrides = CASES[family]
            built[family] = make_gguf(family, tmp_path_factory.mktemp(family), tensor_type=tensor_type,
                                      tokenizer=tokenizer, **overrides)
        return built[family]

    return get


def _hf_greedy(path: Path, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy tokens and last-position log-probabilities, reading the same GGUF file."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = [torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
                    for prompt in prompts]
    return greedy_tokens(model, prompts, NEW_TOKENS), logprobs


@pytest.mark.parametrize("family", list(CASES))
def test_greedy_equals_transformers_on_the_same_file(family, gguf_file):
    path = gguf_file(family)
    llm = LLM(model=str(path), dtype="float32", max_model_len=512, **DEQUANTIZED)
    prompts = make_prompts(vocab_size=llm.engine.arch.vocab_size, lengths=[1, 7, 33, 129])
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    expected, reference_logprobs = _hf_greedy(path, prompts)
    for prompt, output, tokens, logprobs in zip(prompts, outputs, expected, reference_logprobs):
        assert output.outputs[0].token_ids == tokens, f"prompt of {len(prompt)} tokens differs"
        first = output.outputs[0].token_ids[0]
        assert output.outputs[0].logprobs[0][first].logprob == pytest.approx(logprobs[first].item(), abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # the sentencepiece and the byte-level vocabulary
def test_tokenizer_equals_transformers_gguf_tokenizer(family, gguf_file):
    from transformers import AutoTokenizer

    path = gguf_file(family)
    ours = Tokenizer.from_pretrained(path)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS + ["<think>\nhmm 12345 numbers</think> done", "x  \n\n  y"]:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert ours.special_tokens_map == {k: v for k, v in ref.special_tokens_map.items() if isinstance(v, str)}
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    conversations = CONVERSATIONS if family != "llama" else CONVERSATIONS[:1]  # the llama-2 template alternates
    for messages in conversations:
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.render_chat(messages).token_ids == list(expected)


def test_chat_through_the_engine_uses_the_files_template(gguf_file):
    path = gguf_file("qwen2")
    llm = LLM(model=str(path), dtype="float32", max_model_len=512)
    [output] = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(temperature=0.0, max_tokens=4))
    assert output.prompt.startswith("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    assert len(output.outputs[0].token_ids) >= 1


def test_llama3_rope_factors_follow_the_original_checkpoint(tmp_path):
    """llama.cpp stores Llama-3 RoPE scaling as rope_freqs.weight (transformers' GGUF reader ignores it), so the
    reference here is transformers on the safetensors checkpoint the file was written from."""
    from tests.e2e.conftest import hf_greedy

    path = make_gguf("llama3", tmp_path, tensor_type="F32")
    llm = LLM(model=str(path), dtype="float32", max_model_len=512)
    assert llm.engine.arch.rope_scaling is not None
    prompts = make_prompts(lengths=[7, 129])
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    expected = hf_greedy(tmp_path / "hf", prompts, max_new_tokens=NEW_TOKENS)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_bench_with_the_transformers_peer_reads_the_gguf_file(gguf_file, tmp_path):
    import json

    from tokenmill.cli import main

    out = tmp_path / "peer.json"
    code = main(["bench", "latency", "--model", str(gguf_file("qwen2")), "--dtype", "float32", "--input-len", "8",
                 "--output-len", "4", "--runs", "1", "--device", "cpu", "--peer", "transformers", "--json", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["peer_transformers"]["tok_per_s"] > 0
