"""--prefix-cache-scope: whose requests may share prefix-cache hits, as the cache salt the server gives each one.

A shared prefix cache is a timing side channel: a client that gets a fast first token learns that someone
already sent that prefix (vLLM's CVE-2025-46570). The salt keeps hits inside one scope (core/prefix_cache.py):

  global       the salt is the body's cache_salt alone (no salt: everyone shares);
  per-key      one tenant per API key: the salt derives from the key's id (never the key), narrowed by the
               body's cache_salt when given; without any API key configured it is the same as global;
  per-request  a fresh random salt per HTTP request: nothing is ever reused across requests.
"""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Request

from tokenmill.input_checks import check_cache_salt
from tokenmill.server.auth import KEY_ID_STATE

CACHE_SCOPES = ("global", "per-key", "per-request")
DEFAULT_CACHE_SCOPE = "per-key"


def check_cache_scope(scope: str) -> str:
    if scope not in CACHE_SCOPES:
        raise ValueError(f"prefix_cache_scope must be one of {', '.join(CACHE_SCOPES)}, got {scope!r}")
    return scope


def request_cache_salt(scope: str, request: Request, body_salt: object) -> str | None:
    """The engine's cache salt for one HTTP request; the body's cache_salt is checked in every scope."""
    body_salt = check_cache_salt(body_salt)
    if scope == "per-request":
        return "request:" + secrets.token_hex(16)
    key = getattr(request.state, KEY_ID_STATE, None)
    if scope == "global" or key is None:
        return body_salt
    if body_salt is None:
        return f"key:{key}"
    # Hashed so the derived salt stays within the engine's length limit whatever the body sent.
    return f"key:{key}:" + hashlib.blake2b(body_salt.encode("utf-8"), digest_size=16).hexdigest()
