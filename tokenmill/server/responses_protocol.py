"""The request schema of `POST /v1/responses` (OpenAI's Responses API), in pydantic.

The sampling fields and tokenmill's extensions (top_k, min_p, ignore_eos, thinking_token_budget, cache_salt, ...)
are the chat request's (`protocol._Common`), so their ranges have one owner. Responses-specific shapes (input
items, flat function tools, `text.format`) are plain JSON here with their JSON Schema written out for the OpenAPI
document; `responses_input.py` reads them and names the offending field in every error, and the two agree
(tests/server/test_schemathesis.py holds the server to the schema).

Documented Responses parameters this server does not implement are declared with the only value it accepts
(`conversation` null, `include` empty, ...), so sending anything else is a 400 naming the parameter rather
than a silent difference; unknown fields are ignored, as on the other routes (the client's `extra_body`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol import _STREAM_OPTIONS_NEED_STREAM, INTEGRAL, TokenCount, _Common, _documented

# OpenAI's bounds on metadata: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PART_TYPES = ("input_text", "output_text")

_TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"enum": list(TEXT_PART_TYPES)}, "text": {"type": "string"}}}
_TEXT_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}
_REASONING_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"enum": ["reasoning_text", "summary_text"]}, "text": {"type": "string"}}}
# The input items read (responses_input.py): a message ("type" may be left out), a function call the model made,
# a function's result, and a reasoning item given back.
INPUT_ITEM_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": list(MESSAGE_ROLES)}, "content": _TEXT_CONTENT}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1}, "arguments": {"type": "string"}}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string", "minLength": 1},
        "output": _TEXT_CONTENT}},
    {"type": "object", "required": ["type", "summary"], "properties": {
        "type": {"const": "reasoning"}, "summary": {"type": "array", "items": _REASONING_PART},
        "content": {"anyOf": [{"type": "null"}, {"type": "array", "items": _REASONING_PART}]},
        "encrypted_content": {"type": "null"}}},
]
# Function tools in the Responses' flat shape; the name rule and the parameters' shape are the chat tools' own.
RESPONSES_TOOL_SCHEMA = {"type": "object", "required": ["type", "name"], "properties": {
    "type": {"const": "function"},
    "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
    "description": {"type": ["string", "null"]},
    "parameters": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"type": {"const": "object"}}}]},
    "strict": {"type": ["boolean", "null"]},
}}
RESPONSES_TOOL_CHOICE_SCHEMAS: list[dict[str, Any]] = [
    {"type": "null"}, {"enum": ["none", "auto"]},
    {"const": "required", "description": "needs a non-empty tools list"},
    {"type": "object", "required": ["type", "name"], "properties": {
        "type": {"const": "function"}, "name": {"type": "string"}}},
]
TEXT_FORMAT_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "name", "schema"], "properties": {
        "type": {"const": "json_schema"}, "name": {"type": "string"}, "schema": {"type": "object"},
        "strict": {"type": ["boolean", "null"]}, "description": {"type": ["string", "null"]}}},
]
_TEXT_SCHEMA = {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
    "format": {"anyOf": [{"type": "null"}, *TEXT_FORMAT_SCHEMAS]}}}]}
_METADATA_SCHEMA = {"anyOf": [{"type": "null"}, {
    "type": "object", "maxProperties": MAX_METADATA_PAIRS, "propertyNames": {"maxLength": MAX_METADATA_KEY_CHARS},
    "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE_CHARS}}]}


def _only(value: Any, description: str) -> Any:
    """A documented parameter this server does not implement: only `value` (its default) is accepted."""
    schema: dict[str, Any] = {"description": f"not supported: {description}"}
    schema.update({"type": "null"} if value is None else {"const": value})
    return Field(value, json_schema_extra=schema)


# Which of them hold another value, and what to tell the client.
_NOT_SUPPORTED = {
    "conversation": "conversation objects are not supported; chain turns with previous_response_id",
    "include": "no extra output data can be included",
    "prompt": "stored prompt templates are not supported; send the input",
    "reasoning": "reasoning effort and summaries are not configurable; a thinking model's reasoning is "
                 "returned as a reasoning item (see thinking_token_budget to bound it)",
    "truncation": "only 'disabled' is supported: an input longer than the context is an error",
    "top_logprobs": "logprobs are not returned by this route",
    "max_tool_calls": "a limit on tool calls is not supported",
}


_BACKGROUND_IS_STORED_AND_NOT_STREAMED = {
    "if": {"properties": {"background": {"const": True}}, "required": ["background"]},
    "then": {"properties": {"stream": {"const": False}, "store": {"const": True}}},
}


class ResponsesRequest(_Common):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        {"if": {"properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}},
                "required": ["tool_choice"]},
         "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]}},
        _BACKGROUND_IS_STORED_AND_NOT_STREAMED,
    ]})

    input: str | list[dict[str, Any]] = Field(json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "minItems": 1, "items": {"anyOf": INPUT_ITEM_SCHEMAS}}]})
    instructions: str | None = None
    max_output_tokens: TokenCount | None = None
    # One output per response: n is not a Responses parameter, and only its default is meaningful here.
    n: Annotated[int, _documented(minimum=1, maximum=1), INTEGRAL] = 1
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"items": RESPONSES_TOOL_SCHEMA})
    tool_choice: Any = Field(None, json_schema_extra={"anyOf": RESPONSES_TOOL_CHOICE_SCHEMAS})
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = Field(None, json_schema_extra=_TEXT_SCHEMA)
    previous_response_id: Annotated[str, _documented(minLength=1)] | None = None
    store: bool = True
    metadata: dict[str, str] | None = Field(None, json_schema_extra=_METADATA_SCHEMA)
    # Generated after the request returns; GET polls it, cancel stops it (serving_responses.py).
    background: bool = False
    conversation: Any = _only(None, _NOT_SUPPORTED["conversation"])
    include: Annotated[list[str], _documented(maxItems=0)] | None = Field(None, description="not supported: "
                                                                          + _NOT_SUPPORTED["include"])
    prompt: Any = _only(None, _NOT_SUPPORTED["prompt"])
    reasoning: Any = _only(None, _NOT_SUPPORTED["reasoning"])
    truncation: Annotated[str, _documented(enum=["disabled"])] | None = None
    top_logprobs: Annotated[int, _documented(maximum=0, minimum=0), INTEGRAL] | None = None
    max_tool_calls: Any = _only(None, _NOT_SUPPORTED["max_tool_calls"])

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.n != 1:
            raise InvalidRequestError("n", f"a response has one output: n must be 1, got {self.n}")
        if self.background and self.stream:
            raise InvalidRequestError("background", "a background response cannot be streamed: poll it with "
                                      "GET /v1/responses/{id}")
        if self.background and not self.store:
            raise InvalidRequestError("background", "a background response must be stored (store=true)")
        unsupported = {"conversation": self.conversation is not None,
                       "include": bool(self.include), "prompt": self.prompt is not None,
                       "reasoning": self.reasoning is not None,
                       "truncation": self.truncation not in (None, "disabled"),
                       "top_logprobs": bool(self.top_logprobs), "max_tool_calls": self.max_tool_calls is not None}
        for name, is_set in unsupported.items():
            if is_set:
                raise InvalidRequestError(name, _NOT_SUPPORTED[name])
        _check_metadata(self.metadata)

    def num_logprobs(self) -> int | None:
        """What the chat plan asks of a request: this route returns no logprobs."""
        return None


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequestError("metadata", f"at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidRequestError("metadata", f"keys have at most {MAX_METADATA_KEY_CHARS} characters, "
                                      f"got one of {len(key)}")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequestError(f"metadata.{key}", f"at most {MAX_METADATA_VALUE_CHARS} characters, "
                                      f"got {len(value)}")
