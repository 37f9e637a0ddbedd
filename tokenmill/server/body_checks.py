"""Checks of a parsed request body as a whole, before any field is used: text that cannot be encoded and
nesting that would make later recursive code (templating, schema compilation, pydantic dumps) blow up.

Python's json module accepts lone UTF-16 surrogates ("\\ud800") and nests as deep as its recursion limit;
neither can go further (the tokenizer cannot encode a surrogate, a schema 500 levels deep overflows the
grammar compiler), so both are refused here with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tokenmill.errors import InvalidRequestError

# Deeper than any real tool or response schema (a level of a JSON schema is two JSON levels).
MAX_JSON_DEPTH = 64


def check_request_body(body: BaseModel) -> None:
    """Raise InvalidRequestError for the first string with a lone surrogate or the first value nested too deep."""
    fields = {**{name: getattr(body, name) for name in type(body).model_fields}, **(body.model_extra or {})}
    for name, value in fields.items():
        check_json_value(_plain(value), name)


def check_json_value(value: Any, field: str) -> None:
    """Walk one value iteratively (a recursive walk would itself overflow on hostile nesting)."""
    stack: list[tuple[Any, str, int]] = [(value, field, 1)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequestError(_top(path), f"nested deeper than the limit of {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(str(key), path)
                stack.append((child, f"{path}.{key}", depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{path}[{index}]", depth + 1) for index, child in enumerate(item))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(path, f"contains a lone UTF-16 surrogate at character {e.start}; "
                                  "text must be valid Unicode") from None


def _top(path: str) -> str:
    # Deep paths are long and unhelpful: name the top-level field the client sent.
    return path.split(".", 1)[0].split("[", 1)[0]


def _plain(value: Any) -> Any:
    """Pydantic sub-models (messages, stream_options) as the dicts the client sent."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
