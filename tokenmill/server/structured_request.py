"""Request fields that constrain the output: OpenAI `response_format` and vLLM's `guided_*` extensions.

Turns them into one StructuredOutputParams (or None). Schemas, regexes and grammars are compiled by the
engine when the request is added, so an invalid one becomes a 400 naming the field and the problem.
"""

from __future__ import annotations

from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.structured.params import StructuredOutputParams


def structured_outputs(body: Any) -> StructuredOutputParams | None:
    """The one output constraint a request asks for; asking for two is an error naming both."""
    found: list[tuple[str, StructuredOutputParams]] = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None:
        params = _from_response_format(response_format)
        if params is not None:
            found.append(("response_format", params))
    extra = body.model_extra or {}
    if extra.get("guided_json") is not None:
        found.append(("guided_json", StructuredOutputParams(json=extra["guided_json"], source="guided_json")))
    if extra.get("guided_regex") is not None:
        found.append(("guided_regex", StructuredOutputParams(regex=_text(extra["guided_regex"], "guided_regex"))))
    if extra.get("guided_choice") is not None:
        choice = extra["guided_choice"]
        if not isinstance(choice, list):
            raise InvalidRequestError("guided_choice", "must be a list of strings")
        found.append(("guided_choice", StructuredOutputParams(choice=tuple(choice))))
    if extra.get("guided_grammar") is not None:
        found.append(("guided_grammar", StructuredOutputParams(grammar=_text(extra["guided_grammar"], "guided_grammar"))))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequestError(found[1][0], f"only one output constraint per request, got {names}")
    if not found:
        return None
    found[0][1].validate()
    return found[0][1]


def _from_response_format(response_format: Any) -> StructuredOutputParams | None:
    if not isinstance(response_format, dict):
        raise InvalidRequestError("response_format", "must be an object with a 'type'")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutputParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError("response_format.json_schema", "must be an object with a 'schema'")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema", "must be a JSON schema object")
        return StructuredOutputParams(json=schema)
    raise InvalidRequestError(
        "response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(field, "must be a non-empty string")
    return value
