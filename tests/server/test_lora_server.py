"""LoRA adapters over the OpenAI API: the request's `model` picks the adapter (peft's merged model's greedy text,
in one batch with the base model), /v1/models lists them, and adapters load and unload at run time only with
--enable-lora-runtime-updating; bad adapters and names get 4xx errors naming the field."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.checkpoints import make_checkpoint
from tests.lora_adapters import make_peft_adapter, merged_greedy
from tests.server.conftest import MAX_MODEL_LEN, MODEL, LiveServer, start_server, stop_server
from tokenmill.config import CacheConfig, EngineConfig, LoRAConfig
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.server.app import build_app

NUM_TOKENS = 10
PROMPTS = [[17, 99, 230, 41, 8], [300, 12, 77]]


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lora-server")
    paths = {"alpha": make_peft_adapter(model_dir, root / "alpha", rank=4, seed=11),
             "beta": make_peft_adapter(model_dir, root / "beta", rank=8, seed=12, targets=("q_proj", "down_proj")),
             "too-big": make_peft_adapter(model_dir, root / "big", rank=16, seed=13, targets=("v_proj",))}
    other = make_checkpoint("llama", root / "other-base", hidden_size=32, intermediate_size=64)
    paths["wrong-base"] = make_peft_adapter(other, root / "wrong", rank=4, seed=14)
    expected = {name: merged_greedy(model_dir, paths[name], PROMPTS, NUM_TOKENS) for name in ("alpha", "beta")}
    expected[MODEL] = merged_greedy(model_dir, None, PROMPTS, NUM_TOKENS)
    return {"paths": paths, "expected": expected}


def _serve(model_dir: Path, adapters: dict, runtime_updating: bool) -> LiveServer:
    config = EngineConfig(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, compile=False,
                          cache=CacheConfig(num_kv_blocks=256),
                          lora=LoRAConfig(max_loras=2, max_lora_rank=8,
                                          modules=(("alpha", str(adapters["paths"]["alpha"])),)))
    engine = AsyncLLMEngine(LLMEngine(config))
    return start_server(build_app(engine, MODEL, lora_runtime_updating=runtime_updating), engine)


@pytest.fixture(scope="module")
def lora_server(model_dir: Path, adapters: dict) -> Iterator[LiveServer]:
    live = _serve(model_dir, adapters, runtime_updating=True)
    yield live
    stop_server(live)


def _texts(server: LiveServer, models: list[str]) -> list[str]:
    """Greedy completions of every prompt under every model, all in flight at once (one batch)."""
    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(
                client.completions.create(model=model, prompt=prompt, max_tokens=NUM_TOKENS, temperature=0.0,
                                          extra_body={"min_tokens": NUM_TOKENS})
                for model in models for prompt in PROMPTS))

    return [response.choices[0].text for response in asyncio.run(run())]


def _expected_texts(server: LiveServer, adapters: dict, models: list[str]) -> list[str]:
    tokenizer = server.engine.tokenizer
    return [tokenizer.decode(adapters["expected"][model][i]) for model in models for i in range(len(PROMPTS))]


def _post(server: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/{path}", json=body, timeout=60)


def test_model_field_picks_the_adapter_in_a_mixed_batch(lora_server: LiveServer, adapters: dict) -> None:
    models = ["alpha", MODEL, "alpha"]
    texts = _texts(lora_server, models)
    assert texts == _expected_texts(lora_server, adapters, models)
    assert texts[:2] != texts[2:4]  # the adapter changes the output


def test_models_lists_adapters_and_unknown_models_are_404(lora_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=lora_server.base_url, api_key="x", max_retries=0)
    listed = {model.id: model for model in client.models.list().data}
    assert set(listed) >= {MODEL, "alpha"} and listed["alpha"].parent == MODEL
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=2)
    assert error.value.body["param"] == "model" and "'alpha'" in error.value.body["message"]


def test_adapters_load_and_unload_at_run_time(lora_server: LiveServer, adapters: dict) -> None:
    paths = adapters["paths"]
    loaded = _post(lora_server, "load_lora_adapter", {"lora_name": "beta", "lora_path": str(paths["beta"])})
    assert loaded.status_code == 200, loaded.text
    assert _texts(lora_server, ["beta", "alpha"]) == _expected_texts(lora_server, adapters, ["beta", "alpha"])
    again = _post(lora_server, "load_lora_adapter", {"lora_name": "beta", "lora_path": str(paths["alpha"])})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    assert _post(lora_server, "unload_lora_adapter", {"lora_name": "beta"}).status_code == 200
    gone = _post(lora_server, "completions", {"model": "beta", "prompt": PROMPTS[0], "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    missing = _post(lora_server, "unload_lora_adapter", {"lora_name": "beta"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "lora_name"


@pytest.mark.parametrize("case,message", [("wrong-base", "another base model"), ("missing", "cannot read"),
                                          ("too-big", "rank 16 exceeds max_lora_rank 8")])
def test_bad_adapters_are_4xx_naming_lora_path(lora_server: LiveServer, adapters: dict, case: str,
                                               message: str, tmp_path: Path) -> None:
    path = str(tmp_path / "nothing-here") if case == "missing" else str(adapters["paths"][case])
    response = _post(lora_server, "load_lora_adapter", {"lora_name": "bad", "lora_path": path})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "lora_path" and message in error["message"]
    assert "bad" not in {m["id"] for m in httpx.get(f"{lora_server.base_url}/models").json()["data"]}


def test_missing_fields_are_400(lora_server: LiveServer) -> None:
    response = _post(lora_server, "load_lora_adapter", {"lora_name": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora_path"


def test_an_adapter_named_as_the_served_model_is_refused_at_start(model_dir: Path, adapters: dict) -> None:
    config = EngineConfig(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, compile=False,
                          cache=CacheConfig(num_kv_blocks=64),
                          lora=LoRAConfig(max_loras=1, max_lora_rank=8,
                                          modules=((MODEL, str(adapters["paths"]["alpha"])),)))
    with pytest.raises(ValueError, match="is the served model's name"):
        build_app(AsyncLLMEngine(LLMEngine(config)), MODEL)


def test_runtime_updating_is_off_unless_enabled(model_dir: Path, adapters: dict) -> None:
    live = _serve(model_dir, adapters, runtime_updating=False)
    try:
        for path, body in (("load_lora_adapter", {"lora_name": "b", "lora_path": str(adapters["paths"]["beta"])}),
                           ("unload_lora_adapter", {"lora_name": "alpha"})):
            response = _post(live, path, body)
            assert response.status_code == 404
            assert "--enable-lora-runtime-updating" in response.json()["error"]["message"]
        assert _texts(live, ["alpha"]) == _expected_texts(live, adapters, ["alpha"])  # start-up adapters serve
    finally:
        stop_server(live)


def test_the_responses_api_picks_the_adapter_as_chat_does(lora_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=lora_server.base_url, api_key="x", max_retries=0, timeout=120)

    def chat_and_response(model: str) -> tuple[str | None, str]:
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello there"}],
                                              max_tokens=NUM_TOKENS, temperature=0.0, extra_body={"ignore_eos": True})
        response = client.responses.create(model=model, input="hello there", max_output_tokens=NUM_TOKENS,
                                           temperature=0.0, extra_body={"ignore_eos": True})
        return chat.choices[0].message.content, response.output_text

    adapter, base = chat_and_response("alpha"), chat_and_response(MODEL)
    assert adapter[0] == adapter[1] and base[0] == base[1]
    assert adapter != base
