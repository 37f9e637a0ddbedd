"""Live servers for the API tests: uvicorn on 127.0.0.1 (a free port) in a background thread, tiny checkpoints."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig, ThinkingConfig
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.server.app import build_app
from tokenmill.server.http_protocol import uvicorn_config

API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 256
MAX_BODY_BYTES = 1 << 20
WRAP_UP = "\nTime is up.\n"
# A ChatML template whose generation prompt opens the thinking section, as reasoning models' templates do.
THINK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)


@dataclass
class LiveServer:
    base_url: str  # ends in /v1
    root: str
    engine: AsyncLLMEngine
    server: uvicorn.Server
    thread: threading.Thread


def start_server(app, engine: AsyncLLMEngine) -> LiveServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # binding port 0 here avoids racing another process for a "free" port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    root = f"http://127.0.0.1:{port}"
    return LiveServer(root + "/v1", root, engine, server, thread)


def stop_server(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=30)


def make_engine(model_dir: Path, max_queue: int | None = None, thinking: ThinkingConfig = ThinkingConfig(),
                **async_kwargs):
    # Eager: torch.compile has its own test (tests/e2e/test_compile.py) and takes minutes on a small CPU.
    config = EngineConfig(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0, compile=False,
                          cache=CacheConfig(num_kv_blocks=1024),
                          scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512), thinking=thinking)
    return AsyncLLMEngine(LLMEngine(config), max_queue=max_queue, **async_kwargs)


def _make_checkpoint(path: Path) -> Path:
    try:  # the shared test-checkpoint builder, when present
        from tests.checkpoints import make_checkpoint

        return Path(make_checkpoint("llama", path))
    except ImportError:
        from tokenmill.tools.tiny_checkpoint import make_tiny_checkpoint

        return Path(make_tiny_checkpoint(path))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def think_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint with a chat template that opens <think> in the prompt."""
    out = tmp_path_factory.mktemp("tiny-think")
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = THINK_TEMPLATE
    config_file.write_text(json.dumps(config))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[LiveServer]:
    engine = make_engine(model_dir)
    live = start_server(build_app(engine, MODEL, max_body_bytes=MAX_BODY_BYTES), engine)
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def think_servers(think_model_dir: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers: no wrap-up and no default budget; a wrap-up message (the engine's) and a default budget 4."""
    engine = make_engine(think_model_dir)
    plain = start_server(build_app(engine, MODEL, reasoning_parser="think"), engine)
    wrapping_engine = make_engine(think_model_dir, thinking=ThinkingConfig(wrap_up=WRAP_UP))
    wrapped = start_server(build_app(wrapping_engine, MODEL, reasoning_parser="think", default_thinking_budget=4),
                           wrapping_engine)
    yield plain, wrapped
    stop_server(wrapped)
    stop_server(plain)


@pytest.fixture(scope="session")
def guarded_server(model_dir: Path) -> Iterator[LiveServer]:
    """API key required, and a waiting queue of size 0 so every generation request is refused with 503."""
    engine = make_engine(model_dir, max_queue=0)
    live = start_server(build_app(engine, MODEL, api_key=API_KEY), engine)
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def offline_llm(model_dir: Path):
    from tokenmill.llm import LLM

    return LLM(str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256, seed=0)
