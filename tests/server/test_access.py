"""Access guards: the key covers /metrics and is checked before the body is read, an empty key cannot start a
server, Host headers can be restricted, slow headers time out, and the served name is no filesystem path."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, LiveServer, make_engine, start_server, stop_server
from tokenmill.model_catalog import default_model_name, served_name
from tokenmill.server.app import build_app


@pytest.fixture(scope="module")
def locked_server(model_dir) -> Iterator[LiveServer]:
    engine = make_engine(model_dir)
    live = start_server(build_app(engine, MODEL, api_key=API_KEY, allowed_hosts=["127.0.0.1", "localhost"]), engine)
    yield live
    stop_server(live)


def test_metrics_need_the_key_unless_public(locked_server, model_dir):
    assert httpx.get(f"{locked_server.root}/metrics").status_code == 401
    ok = httpx.get(f"{locked_server.root}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and "tokenmill_" in ok.text
    assert httpx.get(f"{locked_server.root}/health").status_code == 200  # probes need no key
    engine = make_engine(model_dir)
    public = start_server(build_app(engine, MODEL, api_key=API_KEY, metrics_public=True), engine)
    try:
        assert httpx.get(f"{public.root}/metrics").status_code == 200
        assert httpx.get(f"{public.base_url}/models").status_code == 401
    finally:
        stop_server(public)


def test_the_key_is_checked_before_the_body_is_parsed(locked_server):
    r = httpx.post(f"{locked_server.base_url}/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_key_is_a_startup_error(key):
    with pytest.raises(ValueError, match="empty"):
        build_app(None, MODEL, api_key=key)  # type: ignore[arg-type] - refused before the engine is touched


def test_allowed_hosts_restrict_the_host_header(locked_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{locked_server.base_url}/models", headers=headers).status_code == 200
    evil = httpx.get(f"{locked_server.base_url}/models", headers={**headers, "Host": "evil.example"})
    assert evil.status_code == 400


def test_slow_headers_are_cut_off(model_dir, monkeypatch):
    from tests.server import conftest

    original = conftest.uvicorn_config
    monkeypatch.setattr(conftest, "uvicorn_config", lambda app, **kw: original(app, timeout_headers=0.5, **kw))
    engine = make_engine(model_dir)
    live = start_server(build_app(engine, MODEL), engine)
    try:
        port = int(live.root.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            closed = False
            while time.monotonic() - started < 4:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")  # a byte now and then: uvicorn's keep-alive timer would reset
                    time.sleep(0.1)
                except OSError:
                    closed = True
                    break
            assert closed or sock.recv(1) == b"", "the connection stayed open while headers trickled in"
            assert time.monotonic() - started < 3
        assert httpx.get(f"{live.root}/health").status_code == 200  # complete requests are unaffected
    finally:
        stop_server(live)


@pytest.mark.parametrize(("model", "name"), [
    ("/srv/secret/models/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct"),
    ("/srv/models/llama/", "llama"),
    ("/data/smollm2-135m-q8_0.gguf", "smollm2-135m-q8_0"),
    ("tokenmill-py-13m", "tokenmill-py-13m"),
])
def test_the_served_name_is_the_model_name_not_its_path(model, name):
    assert served_name(model) == name
    assert served_name(None) == default_model_name()
