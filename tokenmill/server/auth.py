"""API keys: several of them (repeated --api-key, --api-keys-file), checked in constant time before the body is
read, and the id of the key that authenticated a request recorded for it (never the key itself).

The key id is a personalized blake2b of the key: stable across restarts (a tenant's prefix-cache salt derives
from it and the disk tier outlives the process), and useless for recovering the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.server.errors import send_error

_KEY_ID_PERSON = b"tokenmill-apikey"
# Where the middleware records the key id: Starlette's request.state reads scope["state"].
KEY_ID_STATE = "api_key_id"


def key_id(key: str) -> str:
    """The id that stands for a key in the request's state and in cache salts."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16, person=_KEY_ID_PERSON).hexdigest()


def check_api_keys(keys: Sequence[str]) -> list[str]:
    """The keys, each non-empty, without duplicates (first occurrence kept)."""
    unique: list[str] = []
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"API key #{index + 1} is empty: every key must be a non-empty string")
        if key != key.strip():
            raise ValueError(f"API key #{index + 1} has leading or trailing whitespace, which no client can send")
        if key not in unique:
            unique.append(key)
    return unique


def load_api_keys_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are ignored. A missing, unreadable or
    key-less file is an error: a server that meant to require keys must not start open."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-keys-file {path}: cannot read it ({e})") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise ValueError(f"--api-keys-file {path}: holds no key (one key per line; '#' starts a comment)")
    return check_api_keys(keys)


class APIKeys:
    """The accepted keys, kept as digests so every comparison has the same length."""

    def __init__(self, keys: Sequence[str]) -> None:
        keys = check_api_keys(keys)
        if not keys:
            raise ValueError("APIKeys needs at least one key")
        self._digests = [hashlib.sha256(key.encode("utf-8")).digest() for key in keys]
        self._ids = [key_id(key) for key in keys]

    def __len__(self) -> int:
        return len(self._ids)

    def match(self, token: bytes) -> str | None:
        """The id of the key equal to token, or None. Compares against every key whichever matches, so the
        time taken says nothing about which key (or how much of one) was right."""
        digest = hashlib.sha256(token).digest()
        found: str | None = None
        for candidate, candidate_id in zip(self._digests, self._ids):
            if hmac.compare_digest(digest, candidate):
                found = candidate_id
        return found


class APIKeyMiddleware:
    """Require 'Authorization: Bearer KEY' on the protected path prefixes before the body is read, and record
    the authenticating key's id in the request's state (request.state.api_key_id)."""

    def __init__(self, app: ASGIApp, keys: APIKeys, protected: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.protected):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            found = self.keys.match(token)
            if found is None:
                await send_error(send, 401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                  "invalid_request_error", "invalid_api_key")
                return
            scope.setdefault("state", {})[KEY_ID_STATE] = found
        await self.app(scope, receive, send)

