"""API keys: the keys file, the startup errors, constant-time matching against every key, the recorded key id."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from tokenmill.cli import main
from tokenmill.server.auth import KEY_ID_STATE, APIKeyMiddleware, APIKeys, key_id, load_api_keys_file


def test_the_keys_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# tenants\n\nalpha\n  bravo  \n# charlie\n\ndelta\nalpha\n")
    assert load_api_keys_file(path) == ["alpha", "bravo", "delta"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   \n"])
def test_a_keyless_file_is_an_error(tmp_path, text):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"--api-keys-file {path}: holds no key"):
        load_api_keys_file(path)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--api-keys-file .*missing: cannot read it"):
        load_api_keys_file(tmp_path / "missing")


def test_serve_stops_before_loading_a_model_on_bad_keys(tmp_path, capsys):
    # The model path does not exist: reaching the model would fail differently, so these errors come first.
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match="tokenmill serve: --api-keys-file .*missing: cannot read it"):
        main(["serve", "--model", str(tmp_path / "no-model"), "--api-keys-file", str(missing)])
    empty = tmp_path / "empty"
    empty.write_text("# nobody\n")
    with pytest.raises(SystemExit, match="holds no key"):
        main(["serve", "--model", str(tmp_path / "no-model"), "--api-keys-file", str(empty)])
    with pytest.raises(SystemExit, match="API key #2 is empty"):
        main(["serve", "--model", str(tmp_path / "no-model"), "--api-key", "a", "--api-key", " "])
    with pytest.raises(SystemExit):  # argparse refuses an unknown scope
        main(["serve", "--model", str(tmp_path / "no-model"), "--prefix-cache-scope", "per-user"])
    assert "invalid choice: 'per-user'" in capsys.readouterr().err


def test_match_names_the_key_by_its_id_never_the_key():
    keys = APIKeys(["alpha", "bravo"])
    assert keys.match(b"bravo") == key_id("bravo") != key_id("alpha")
    assert keys.match(b"alpha") == key_id("alpha")
    assert keys.match(b"alph") is None and keys.match(b"") is None and keys.match(b"alpha ") is None
    assert "alpha" not in key_id("alpha") and len(key_id("alpha")) == 32
    # Stable across restarts (a tenant's salt derives from it and the disk tier outlives the process).
    assert key_id("alpha") == hashlib.blake2b(b"alpha", digest_size=16, person=b"tokenmill-apikey").hexdigest()


def _call(middleware: APIKeyMiddleware, path: str, token: bytes | None) -> tuple[list[dict], dict]:
    sent: list[dict] = []
    seen: dict = {}
    headers = [] if token is None else [(b"authorization", b"Bearer " + token)]
    scope = {"type": "http", "path": path, "headers": headers}

    async def app(scope, receive, send):
        seen.update(scope.get("state", {}))

    async def send(message):
        sent.append(message)

    middleware.app = app
    asyncio.run(middleware(scope, None, send))  # type: ignore[arg-type]
    return sent, seen


def test_the_middleware_records_which_key_authenticated():
    middleware = APIKeyMiddleware(None, APIKeys(["alpha", "bravo"]), ("/v1",))  # type: ignore[arg-type]
    sent, seen = _call(middleware, "/v1/completions", b"bravo")
    assert not sent and seen == {KEY_ID_STATE: key_id("bravo")}
    sent, seen = _call(middleware, "/v1/completions", b"charlie")
    assert sent[0]["status"] == 401 and not seen
    sent, seen = _call(middleware, "/health", None)  # unprotected paths pass without a key id
    assert not sent and seen == {}
