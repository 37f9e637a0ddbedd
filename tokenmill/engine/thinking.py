"""Thinking-budget token ids, derived from the engine's tokenizer and `EngineConfig.thinking`.

A request that sets `thinking_token_budget` and no ids of its own gets the start tag's id, the ids forced
when the budget is spent (wrap-up message + end tag), and whether its prompt already opened the section:
offline `LLM` users and the server get the same budget without building ids by hand. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from tokenmill.config import ThinkingConfig
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


@dataclass(frozen=True)
class ThinkingTokens:
    """What SamplingParams needs to enforce a thinking budget for one tokenizer."""

    start_token_id: int | None  # None when the start tag is not a single token
    end_token_ids: list[int] = field(default_factory=list)  # forced when the budget is spent
    end_tag_ids: list[int] = field(default_factory=list)  # the end tag alone (counting reasoning tokens)


def thinking_tokens(tokenizer: TokenizerLike, config: ThinkingConfig) -> ThinkingTokens:
    """Token ids of the start tag (when it is one token) and of the wrap-up message + end tag."""
    start_id = tokenizer.token_to_id(config.start)
    if start_id is None:
        start_ids = tokenizer.encode(config.start, add_special_tokens=False)
        start_id = start_ids[0] if len(start_ids) == 1 else None
    end_tag_ids = tokenizer.encode(config.end, add_special_tokens=False)
    wrap_ids = tokenizer.encode(config.wrap_up, add_special_tokens=False) if config.wrap_up else []
    return ThinkingTokens(start_id, wrap_ids + end_tag_ids, end_tag_ids)


def prompt_opens_thinking(prompt_text: str | None, config: ThinkingConfig) -> bool:
    """True when the rendered prompt ends inside an open thinking section (e.g. '...assistant\\n<think>\\n')."""
    if not prompt_text:
        return False
    start = prompt_text.rfind(config.start)
    if start < 0 or prompt_text.rfind(config.end) > start:
        return False
    # Only whitespace may follow the opening tag: a tag quoted earlier in a message does not count.
    return not prompt_text[start + len(config.start) :].strip()


def with_thinking_ids(params: SamplingParams, tokens: ThinkingTokens | None, config: ThinkingConfig,
                      tokenizer: TokenizerLike | None, prompt_text: str | None,
                      prompt_token_ids: list[int]) -> SamplingParams:
    """`params` with the thinking ids filled in when it has a budget and no ids of its own.

    `tokens` is None when the engine has no tokenizer. A budget the engine cannot enforce is an
    InvalidRequestError naming thinking_token_budget, never a silently ignored budget."""
    if params.thinking_token_budget is None or params.thinking_end_token_ids:
        return params
    if tokens is None or tokenizer is None:
        raise InvalidRequestError("thinking_token_budget", "this checkpoint has no tokenizer to find the end tag "
                                  f"{config.end!r} with; pass thinking_end_token_ids yourself")
    if not tokens.end_tag_ids:
        raise InvalidRequestError("thinking_token_budget", f"this model's tokenizer cannot encode the end tag "
                                  f"{config.end!r}")
    if prompt_text is None:
        # Token-id prompts: read the tags as text, special tokens included, as a chat template wrote them.
        prompt_text = tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
    return replace(
        params,
        thinking_start_token_id=tokens.start_token_id,
        thinking_end_token_ids=list(tokens.end_token_ids),
        starts_in_thinking=params.starts_in_thinking or prompt_opens_thinking(prompt_text, config),
    )
