"""Request schemas of the OpenAI-compatible API (pydantic), and their mapping to SamplingParams.

Unknown fields are accepted and ignored: OpenAI clients send `extra_body` entries as top-level JSON
fields, and tokenmill's own extensions (top_k, min_p, ignore_eos, thinking_token_budget, ...) arrive that
way. Range checks live in SamplingParams.validate so the engine and the server report the same limits.
Types are strict: `false` is not token id 0 and "3" is not n=3 (what the schema says is what is accepted).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import MAX_LOGPROBS, SamplingParams
from tokenmill.structured.params import StructuredOutputParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    n: int = 1
    temperature: float | None = None  # OpenAI's default is 1.0
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM's names), sent through the client's extra_body.
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    thinking_token_budget: int | None = None

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias", "is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "is only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # the completions API's documented default
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

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
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(
                "best_of", f"only best_of == n is supported, got best_of={self.best_of}, n={self.n}")
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

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
        seed=request.seed,
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

