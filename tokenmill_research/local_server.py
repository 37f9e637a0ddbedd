"""A tokenmill server started in this process when no --base-url is given.

This is the one module of tokenmill_research that imports the engine: everything else talks to an
OpenAI-compatible endpoint. It serves on a free loopback port with prefix caching and prompt-lookup
(n-gram) drafting on, the two engine features the assistant's calls profit from: they share long
prefixes (instructions, evidence) and the summaries quote the evidence.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

LOCAL_MAX_MODEL_LEN = 4096
LOCAL_MAX_NUM_SEQS = 16  # a report runs a handful of requests at once (sections; the judge's prompts)
LOCAL_MAX_BATCHED_TOKENS = 1024
START_TIMEOUT_S = 60.0


@dataclass
class LocalServer:
    base_url: str
    model_name: str
    _server: object
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True  # type: ignore[attr-defined]
        self._thread.join(timeout=30)


# The default model's GGUF is Q4_1; its int4 kernel measured far slower than float weights for the
# prompt-heavy calls of a report on this CPU (6 judge prompts: 220 s against about 4 s), so a local engine
# dequantizes by default (135M parameters: about 0.5 GB in float32).
LOCAL_QUANTIZATION = "none"
LOCAL_DTYPE = "float32"


def start_local_server(model: str | None, fast_paths: bool = True, max_model_len: int = LOCAL_MAX_MODEL_LEN,
                       quantization: str | None = LOCAL_QUANTIZATION) -> LocalServer:
    """fast_paths: prefix caching and n-gram drafting on (off: both off, for `research bench`)."""
    import uvicorn

    from tokenmill.engine.async_engine import AsyncLLMEngine
    from tokenmill.llm import LLM
    from tokenmill.model_catalog import served_name
    from tokenmill.server.app import build_app
    from tokenmill.server.http_protocol import uvicorn_config

    # Eager: compiling takes minutes on a CPU, longer than a whole report. A fixed draft length: the adaptive
    # one first times 30-odd target steps (measured 77 s of an 81 s start on this loaded 2-core machine).
    llm = LLM(model, compile=False, max_model_len=max_model_len, enable_prefix_caching=fast_paths,
              speculative_method="ngram" if fast_paths else None, speculative_adaptive=False,
              max_num_seqs=LOCAL_MAX_NUM_SEQS, max_num_batched_tokens=LOCAL_MAX_BATCHED_TOKENS,
              quantization=quantization, dtype=LOCAL_DTYPE)
    name = served_name(model)
    engine = AsyncLLMEngine(llm.engine)
    app = build_app(engine, served_model_name=name, prefix_cache_scope="global")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free one, no race with another process
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="tokenmill-server")
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the local tokenmill server did not start")
        time.sleep(0.02)
    return LocalServer(f"http://127.0.0.1:{port}/v1", name, server, thread)
