"""Sampling through the whole engine, and the offline API's features (n, stops, logprobs, stream, chat)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tests.e2e.conftest import hf_last_logits, make_prompts
from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(checkpoint_dir) -> LLM:
    return LLM(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=512)


def test_a_seeded_request_gives_the_same_tokens_whatever_else_is_in_the_batch(llm):
    prompt = {"prompt_token_ids": make_prompts(lengths=[20], seed=3)[0]}
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in make_prompts(lengths=[5, 40, 9], seed=4)]
    noise = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batch = llm.generate(others[:2] + [prompt] + others[2:], [noise, noise, seeded, noise])
    assert batch[2].outputs[0].token_ids == alone


def test_first_token_frequencies_match_softmax_with_top_k(llm, checkpoint_dir):
    """Over many seeds, one step's tokens follow softmax(logits / T) restricted to the top k."""
    prompt = make_prompts(lengths=[12], seed=8)[0]
    temperature, top_k, draws = 0.8, 6, 3000
    params = [SamplingParams(temperature=temperature, top_k=top_k, seed=s, max_tokens=1) for s in range(draws)]
    outputs = llm.generate([{"prompt_token_ids": prompt}] * draws, params)
    logits = hf_last_logits(checkpoint_dir("llama"), [prompt])[0] / temperature
    top = torch.topk(logits, top_k)
    expected = torch.softmax(top.values.double(), dim=-1).numpy()
    expected /= expected.sum()
    counts = {t: 0 for t in top.indices.tolist()}
    for output in outputs:
        token = output.outputs[0].token_ids[0]
        assert token in counts, "a token outside the top k was sampled"
        counts[token] += 1
    observed = np.array([counts[t] for t in top.indices.tolist()])
    assert chisquare(observed, expected * draws).pvalue > 0.001


def test_n_samples_share_the_prompt_and_differ(llm):
    prompt = {"prompt_token_ids": make_prompts(lengths=[40], seed=9)[0]}
    output = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert [o.index for o in output.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 for o in output.outputs)
    assert len({tuple(o.token_ids) for o in output.outputs}) > 1
    again = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in output.outputs]


def test_stop_string_is_cut_from_the_text(llm):
    prompt = "def fibonacci(n):"
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:6]  # spans token boundaries in general
    stopped = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    completion = stopped.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == free.text[: free.text.index(stop)]
    kept = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    )[0]
    assert kept.outputs[0].text == free.text[: free.text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    prompt = {"prompt_token_ids": make_prompts(lengths=[10], seed=2)[0]}
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[4]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id]))
    completion = out[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id
    assert completion.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    forced = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=15)
    )[0].outputs[0]
    assert stop_id not in forced.token_ids[:15]


def test_prompt_logprobs_match_transformers(llm, checkpoint_dir):
    from transformers import AutoModelForCausalLM

    prompt = make_prompts(lengths=[30], seed=6)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        token = prompt[pos]
        assert entry[token].logprob == pytest.approx(reference[pos - 1, token].item(), rel=1e-4, abs=1e-5)
        assert len(entry) in (2, 3)


def test_streaming_yields_deltas_that_add_up_to_generate(llm):
    # LLM.stream yields deltas (it used to yield cumulative outputs): one new token per step here.
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    final = llm.generate("Hello", params)[0].outputs[0]
    outputs = list(llm.stream("Hello", params))
    assert len(outputs) == 16
    assert all(len(o.outputs[0].token_ids) == 1 for o in outputs)
    assert "".join(o.outputs[0].text for o in outputs) == final.text
    assert [t for o in outputs for t in o.outputs[0].token_ids] == final.token_ids
    assert [o.finished for o in outputs] == [False] * 15 + [True]


def test_chat_renders_the_template(llm):
    messages = [{"role": "user", "content": "Hi there"}]
    output = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.encode("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert output.prompt_token_ids == expected
    assert len(output.outputs[0].token_ids) == 5


def test_eos_from_generation_config_stops(checkpoint_dir):
    llm = LLM(model=str(checkpoint_dir("llama")), dtype="float32", max_model_len=512)
    prompt = {"prompt_token_ids": make_prompts(lengths=[10], seed=2)[0]}
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    # Pretend the 5th generated token is an EOS id: generation stops right there.
    llm.engine.eos_token_ids = (free.token_ids[4],)
    stopped = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[4]) + 1]
