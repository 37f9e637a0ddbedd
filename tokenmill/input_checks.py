"""Checks of client-supplied values that every entry point applies (the server's bodies, `LLM.generate` and
`LLM.chat`, SamplingParams): text must be valid Unicode and nesting bounded.

Python accepts lone UTF-16 surrogates in str ("\\ud800", from JSON escapes or a caller's string) and nests
as deep as its recursion limit; neither can go further (the tokenizer cannot encode a surrogate, a schema 500
levels deep overflows the grammar compiler), so both are refused with an InvalidRequestError naming the field.
"""

from __future__ import annotations

from typing import Any

from tokenmill.errors import InvalidRequestError

# Deeper than any real tool or response schema (a level of a JSON schema is two JSON levels).
MAX_JSON_DEPTH = 64
# A prefix-cache salt names a tenant or a conversation; longer would only cost hashing time.
MAX_CACHE_SALT_CHARS = 256


def check_text(text: str, field: str) -> None:
    """Refuse text the tokenizer cannot encode: a lone UTF-16 surrogate."""
    if text.isascii():  # the common case, without encoding a copy
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(field, f"contains a lone UTF-16 surrogate at character {e.start}; "
                                  "text must be valid Unicode") from None


def check_cache_salt(value: object, field: str = "cache_salt") -> str | None:
    """A cache salt: None, or a non-empty string of at most MAX_CACHE_SALT_CHARS characters of valid Unicode."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(field, f"must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_CACHE_SALT_CHARS:
        raise InvalidRequestError(field, f"must have 1 to {MAX_CACHE_SALT_CHARS} characters, got {len(value)}")
    check_text(value, field)
    return value


def check_json_value(value: Any, field: str) -> None:
    """Every string (and key) in a JSON-like value valid Unicode, nesting at most MAX_JSON_DEPTH levels.

    The walk is iterative: a recursive one would itself overflow on hostile nesting."""
    stack: list[tuple[Any, str, int]] = [(value, field, 1)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequestError(_top(path), f"nested deeper than the limit of {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                check_text(str(key), path)
                stack.append((child, f"{path}.{key}", depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{path}[{index}]", depth + 1) for index, child in enumerate(item))


def _top(path: str) -> str:
    # Deep paths are long and unhelpful: name the top-level field the client sent.
    return path.split(".", 1)[0].split("[", 1)[0]
