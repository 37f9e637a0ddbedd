"""The prompt-length rule, written once: the engine applies it to every request and the server applies it
before it sizes max_tokens, so both report the same limit in the same words."""

from __future__ import annotations

from tokenmill.errors import InvalidRequestError


def check_prompt_length(num_tokens: int, max_model_len: int, field: str = "prompt") -> None:
    """The prompt plus at least one generated token must fit the context; `field` names what the user sent."""
    if num_tokens >= max_model_len:
        raise InvalidRequestError(
            field,
            f"the prompt has {num_tokens} tokens, but max_model_len is {max_model_len}: "
            "the prompt plus at least one generated token must fit",
        )
