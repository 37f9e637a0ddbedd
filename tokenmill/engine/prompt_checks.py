"""The prompt-length rules, written once: the engine applies them to every request and the server applies
them before it sizes max_tokens, so both report the same limit in the same words.

The byte rule runs before tokenizing: a text longer than max_model_len tokens of the vocabulary's longest
token can never fit, so it is refused without spending a tokenizer pass on megabytes of text."""

from __future__ import annotations

from collections.abc import Iterable

from tokenmill.errors import InvalidRequestError


def check_prompt_length(num_tokens: int, max_model_len: int, field: str = "prompt") -> None:
    """The prompt plus at least one generated token must fit the context; `field` names what the user sent."""
    if num_tokens >= max_model_len:
        raise InvalidRequestError(
            field,
            f"the prompt has {num_tokens} tokens, but max_model_len is {max_model_len}: "
            "the prompt plus at least one generated token must fit",
        )


# A normalizer may shrink text (NFKC maps a 3-byte full-width letter to 1 byte), and a UTF-8 character is at
# most 4 bytes: with this factor the byte rule never refuses a prompt that the token rule would accept.
_NORMALIZATION_SLACK = 4


def max_prompt_bytes(max_model_len: int, max_token_bytes: int) -> int:
    """The most UTF-8 bytes a prompt that fits the context can have."""
    return max_model_len * max(max_token_bytes, 1) * _NORMALIZATION_SLACK


def check_prompt_bytes(text: str, max_model_len: int, max_token_bytes: int, field: str = "prompt") -> None:
    """Refuse, before tokenizing, a text too long in bytes to fit max_model_len tokens of the vocabulary."""
    limit = max_prompt_bytes(max_model_len, max_token_bytes)
    # len(text) <= bytes <= 4 * len(text): only texts near the limit need the encoded length.
    if len(text) > limit or (4 * len(text) > limit and len(text.encode("utf-8", "surrogatepass")) > limit):
        raise InvalidRequestError(
            field, f"the prompt is longer than {limit} bytes, more than max_model_len ({max_model_len}) tokens "
            "of this vocabulary can hold")


def longest_token_bytes(tokens: Iterable[str | None]) -> int:
    """The longest token's text in UTF-8 bytes: an upper bound of the prompt bytes one token covers."""
    return max((len(t.encode("utf-8")) for t in tokens if t), default=1)
