"""Request schemas of the OpenAI-compatible API (pydantic), and their mapping to SamplingParams.

Unknown fields are accepted and ignored: OpenAI clients send `extra_body` entries as top-level JSON
fields, and tokenmill's own extensions (top_k, min_p, ignore_eos, thinking_token_budget, ...) arrive that
way. Range checks live in SamplingParams.validate so the engine and the server report the same limits.
Types are strict: `false` is not token id 0 and "3" is not n=3 (what the schema says is what is accepted).

The schema states the ranges too (the bounds below are SamplingParams' limits, which stay the rules' owner),
so a client or a fuzzer reading the OpenAPI document knows what will be accepted; `build_app` adds the bounds
that depend on the model (token ids below the vocabulary, top_k up to it).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tokenmill.errors import InvalidRequestError
from tokenmill.input_checks import MAX_CACHE_SALT_CHARS
from tokenmill.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, TOP_K_OFF, SamplingParams
from tokenmill.structured.params import StructuredOutputParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


def _integral(value: Any) -> Any:
    """JSON Schema's integers include 3.0; strict mode would refuse it (while still refusing true and "3")."""
    return int(value) if type(value) is float and value.is_integer() else value


def _documented(**keywords: Any) -> Any:
    """JSON Schema bounds written into the document only: the rule's owner (SamplingParams, the engine, the
    checks below) enforces it, with its own words, so the schema and the errors cannot disagree."""
    return Field(json_schema_extra=keywords)


INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]
StopString = Annotated[str, _documented(minLength=1)]
# The vocabulary's bounds are the model's: build_app writes them where these markers are (server/openapi_bounds.py).
VOCAB_BOUND = "x-vocab-bound"
TokenId = Annotated[int, _documented(minimum=0, **{VOCAB_BOUND: "token_id"}), INTEGRAL]
Penalty = Annotated[float, _documented(minimum=-2.0, maximum=2.0)]
LogprobCount = Annotated[int, _documented(minimum=0, maximum=MAX_LOGPROBS), INTEGRAL]
TokenCount = Annotated[int, _documented(minimum=1), INTEGRAL]
NonNegative = Annotated[int, _documented(minimum=0), INTEGRAL]
# Rules between fields, in JSON Schema's words: options that only apply with another field's value.
_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
}


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    model: str | None = None
    n: Annotated[int, _documented(minimum=1, maximum=MAX_N), INTEGRAL] = 1
    temperature: Annotated[float, _documented(minimum=0)] | None = None  # OpenAI's default is 1.0
    top_p: Annotated[float, _documented(exclusiveMinimum=0, maximum=1)] | None = None
    stop: StopString | Annotated[list[StopString], _documented(maxItems=MAX_STOP_STRINGS)] | None = None
    # Any integer: sampling_params reduces it to the 64 bits a generator takes. A bound would be unreachable
    # exactly (JSON's 9223372036854775807.0 parses as 2**63).
    seed: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: Annotated[dict[str, float], _documented(maxProperties=0)] | None = Field(
        None, description="not supported: only {} or null")
    user: str | None = None
    # Extensions (vLLM's names), sent through the client's extra_body.
    top_k: Annotated[int, _documented(minimum=TOP_K_OFF, **{VOCAB_BOUND: "top_k"}), INTEGRAL] = Field(
        0, description="0 or -1: off; else at most the vocabulary size")
    min_p: Annotated[float, _documented(minimum=0, maximum=1)] = 0.0
    repetition_penalty: Annotated[float, _documented(exclusiveMinimum=0)] = 1.0
    min_tokens: NonNegative = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    thinking_token_budget: NonNegative | None = None
    # Prefix-cache hits only come from requests with the same salt, within the server's --prefix-cache-scope.
    cache_salt: Annotated[str, _documented(minLength=1, maxLength=MAX_CACHE_SALT_CHARS)] | None = None

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias", "is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "is only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptText = Annotated[str, _documented(minLength=1)]
PromptTokens = Annotated[list[TokenId], _documented(minItems=1)]


class CompletionRequest(_Common):
    prompt: PromptText | Annotated[list[PromptText], _documented(minItems=1)] | PromptTokens | \
        Annotated[list[PromptTokens], _documented(minItems=1)]
    max_tokens: TokenCount | None = 16  # the completions API's documented default
    logprobs: LogprobCount | None = None
    echo: bool = False
    suffix: Annotated[str, _documented(maxLength=0)] | None = Field(None, description="not supported: only \"\" or null")
    # OpenAI's best_of must equal n here, a rule between two fields that JSON Schema cannot state: it is read
    # from the request's extra fields (best_of_field) and left out of the schema rather than described wrongly.

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of single prompts (text or token ids)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise InvalidRequestError("suffix", "is not supported by this server")
        best_of = (self.model_extra or {}).get("best_of")
        if best_of is not None and (type(best_of) is not int or best_of != self.n):
            raise InvalidRequestError("best_of", f"only best_of == n is supported, got best_of={best_of!r}, n={self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


# The roles OpenAI's API defines (plus "ipython", Llama 3's tool-result role). Any other role would reach the
# chat template as text the client chose to sit where the template writes control tokens.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def check_roles(messages: list["ChatMessage"]) -> None:
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{index}].role",
                                      f"must be one of {', '.join(CHAT_ROLES)}, got {message.role[:40]!r}")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Annotated[str, Field(json_schema_extra={"const": "text"})]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Annotated[str, Field(json_schema_extra={"enum": list(CHAT_ROLES)})]  # check_roles says it in words
    content: str | list[TextPart] | None = None


# The shapes tool_parsers/schema.py and structured_request.py accept. Two rules stay in words only: function names
# are unique within a request, and a named tool_choice names one of its tools (JSON Schema cannot compare
# values across a list); a schema inside (tool parameters, response_format's) must be one the compiler accepts.
_OBJECT_SCHEMA = {"type": "object", "properties": {"type": {"const": "object"}}}
TOOL_SCHEMA = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": {"type": ["string", "null"]},
        "parameters": {"anyOf": [{"type": "null"}, _OBJECT_SCHEMA]},
        "strict": {"type": ["boolean", "null"]},
    }},
}}
NAMED_TOOL_CHOICE_SCHEMA = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
}}
RESPONSE_FORMAT_SCHEMAS = [
    {"type": "null"},
    {"type": "object", "properties": {"type": {"enum": ["text", "json_object", None]}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["schema"], "properties": {"schema": {"type": "object"}}},
    }},
]


class ChatCompletionRequest(_Common):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        {"if": {"properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}},
                "required": ["tool_choice"]},
         "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]}},
        {"if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
         "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(None, json_schema_extra={VOCAB_BOUND: "template_kwargs"})
    # Checked by their owners (tool_parsers/schema.py, structured_request.py); the schemas say the same shapes.
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"items": TOOL_SCHEMA})
    tool_choice: Any = Field(None, json_schema_extra={"anyOf": [
        {"type": "null"}, {"enum": ["none", "auto"]}, NAMED_TOOL_CHOICE_SCHEMA,
        {"const": "required", "description": "needs a non-empty tools list"}]})
    response_format: dict[str, Any] | None = Field(None, json_schema_extra={"anyOf": RESPONSE_FORMAT_SCHEMAS})

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is None:
            return self.max_tokens  # checked where the limit is applied (sampling_params)
        if self.max_tokens is not None and self.max_tokens < 1:  # shadowed, but still the client's error
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        return self.max_completion_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError("top_logprobs", "needs logprobs to be true")
            return None
        return self.top_logprobs or 0

    parallel_tool_calls: bool = True


def sampling_params(
    request: _Common,
    *,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    skip_special_tokens: bool | None = None,
    thinking_token_budget: int | None = None,
    structured: StructuredOutputParams | None = None,
) -> SamplingParams:
    """SamplingParams for one prompt: max_tokens is capped so that prompt + output fit the context.

    A streamed request gets delta outputs (each SSE chunk is built from what is new); a non-streamed one
    gets its whole result once, when it finishes."""
    room = max_model_len - prompt_len
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError("max_tokens", f"must be >= 1, got {max_tokens}")
    limit = room if max_tokens is None else min(max_tokens, room)
    return SamplingParams(
        n=request.n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        seed=None if request.seed is None else (request.seed + 2**63) % 2**64 - 2**63,  # into int64, wrapping
        max_tokens=limit,
        min_tokens=min(request.min_tokens, limit) if request.min_tokens >= 0 else request.min_tokens,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=request.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        structured_outputs=structured,
        thinking_token_budget=thinking_token_budget,  # the engine adds the tag ids
        output_kind="delta" if request.stream else "final_only",
    )

