"""Checks of a parsed request body as a whole, before any field is used: text that cannot be encoded and
nesting that would make later recursive code (templating, schema compilation, pydantic dumps) blow up.

Python's json module accepts lone UTF-16 surrogates ("\\ud800") and nests as deep as its recursion limit;
the rules themselves live in `tokenmill.input_checks` (the offline entry points apply them too); here they
run over the whole body at once, so each gets a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tokenmill.input_checks import check_json_value


def check_request_body(body: BaseModel) -> None:
    """Raise InvalidRequestError for the first string with a lone surrogate or the first value nested too deep."""
    fields = {**{name: getattr(body, name) for name in type(body).model_fields}, **(body.model_extra or {})}
    for name, value in fields.items():
        check_json_value(_plain(value), name)


def _plain(value: Any) -> Any:
    """Pydantic sub-models (messages, stream_options) as the dicts the client sent."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
