"""StructuredOutputParams: what shape a request's output must take, validated and given a cache key.

Pure Python (no torch, no grammar library) so SamplingParams and `core/` can hold it.
"""

from __future__ import annotations

import json as _json
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenmill.errors import InvalidRequestError

# The request field each option arrives in (OpenAI `response_format`, vLLM `guided_*`), so errors name it.
ERROR_FIELDS = {
    "json": "response_format",
    "json_object": "response_format",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}
# Bounds that keep one request from making the engine compile something enormous.
MAX_CHOICES = 1024
MAX_SOURCE_CHARS = 1 << 20


@dataclass(frozen=True)
class StructuredOutputParams:
    """Exactly one of the options: the output must match it, then end with EOS.

    json: a JSON schema, as a dict or its JSON text. json_object: any JSON object. regex: the output
    fully matches it (Rust `regex` syntax). choice: the output is exactly one of the strings. grammar:
    a context-free grammar in llguidance's Lark dialect or in llama.cpp GBNF (`root ::= ...`).
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    # The request field this came from, when it is not the usual one for its kind (e.g. "guided_json",
    # or "tools" for a forced tool call), so errors name what the user actually sent.
    source: str | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        """The one option that is set: "json", "json_object", "regex", "choice" or "grammar"."""
        self.validate()
        return self._set_options()[0]

    @property
    def error_field(self) -> str:
        """The request field to name in errors about this option."""
        return self.source or ERROR_FIELDS[self.kind]

    def _set_options(self) -> list[str]:
        values = {"json": self.json, "json_object": self.json_object or None, "regex": self.regex,
                  "choice": self.choice, "grammar": self.grammar}
        return [name for name, value in values.items() if value is not None]

    def validate(self) -> None:
        """Exactly one option set, of the right type; a JSON schema given as text must parse to an object."""
        chosen = self._set_options()
        if len(chosen) != 1:
            found = ", ".join(chosen) if chosen else "none"
            raise InvalidRequestError(
                "structured_outputs", f"set exactly one of json, json_object, regex, choice, grammar (got {found})")
        kind = chosen[0]
        field = self.source or ERROR_FIELDS[kind]
        if kind == "json":
            self.schema()
        elif kind == "json_object" and self.json_object is not True:
            raise InvalidRequestError(field, f"json_object must be a boolean, got {self.json_object!r}")
        elif kind == "choice":
            choices = self.choice
            if not isinstance(choices, (list, tuple)) or not choices:
                raise InvalidRequestError(field, "must be a non-empty list of strings")
            if len(choices) > MAX_CHOICES:
                raise InvalidRequestError(field, f"at most {MAX_CHOICES} choices, got {len(choices)}")
            for i, choice in enumerate(choices):
                if not isinstance(choice, str):
                    raise InvalidRequestError(field, f"choice {i} must be a string, got {type(choice).__name__}")
            _check_size(field, sum(len(c) for c in choices))
        elif kind in ("regex", "grammar"):
            source = self.regex if kind == "regex" else self.grammar
            if not isinstance(source, str):
                raise InvalidRequestError(field, f"must be a string, got {type(source).__name__}")
            if kind == "grammar" and not source.strip():
                raise InvalidRequestError(field, "the grammar is empty")
            _check_size(field, len(source))

    def schema(self) -> dict[str, Any]:
        """The JSON schema as a dict ({"type": "object"} for json_object)."""
        if self.json_object is True and self.json is None:
            return {"type": "object"}
        field = ERROR_FIELDS["json"]
        value: Any = self.json
        if isinstance(value, str):
            _check_size(field, len(value))
            try:
                value = _json.loads(value)
            except _json.JSONDecodeError as e:
                raise InvalidRequestError(field, f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(value, Mapping):
            raise InvalidRequestError(field, f"the JSON schema must be a JSON object, got {type(value).__name__}")
        return dict(value)

    def cache_key(self) -> Hashable:
        """Equal for requests that compile to the same grammar (schema keys sorted, so dict order and
        whitespace in schema text do not matter)."""
        self.validate()
        kind = self._set_options()[0]
        if kind in ("json", "json_object"):
            try:
                canonical = _json.dumps(self.schema(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            except (TypeError, ValueError) as e:  # a dict holding sets, NaN keys or other non-JSON values
                raise InvalidRequestError(ERROR_FIELDS[kind], f"the JSON schema is not serializable: {e}") from None
            _check_size(ERROR_FIELDS[kind], len(canonical))
            return (kind, canonical)
        if kind == "choice":
            return (kind, tuple(self.choice or ()))
        return (kind, self.regex if kind == "regex" else self.grammar)


def _check_size(field: str, size: int) -> None:
    if size > MAX_SOURCE_CHARS:
        raise InvalidRequestError(field, f"at most {MAX_SOURCE_CHARS} characters, got {size}")
