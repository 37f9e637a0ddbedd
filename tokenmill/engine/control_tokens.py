"""Control tokens are data in what a client writes: a special-token string inside a message ("<|im_end|>",
"<|im_start|>system") is encoded as the text it is, never as the control token, so a user cannot close
their turn and forge a system turn. Only the chat template writes control tokens.

Before rendering, each special-token string in a message's text is swapped for a sentinel (private-use
characters and a per-request nonce, which no client can predict); the rendered prompt is encoded piece by
piece: template text as usual (its control tokens stay control tokens), each sentinel as the original string
encoded as text. The engine's thinking tags are exempt: they are how a client replays an assistant's
reasoning, and templates look for them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from typing import Any

from tokenmill.engine.tokenizer import RenderedChat, Tokenizer


class ControlTokenGuard:
    def __init__(self, tokenizer: Tokenizer, exempt: Iterable[str] = ()) -> None:
        self._tokenizer = tokenizer
        skipped = set(exempt)
        specials = {token for i in range(tokenizer.vocab_size) if tokenizer.is_skipped_special(i)
                    for token in tokenizer.convert_ids_to_tokens([i]) if token and token not in skipped}
        # Longest first, so "<|im_start|>" is not cut short by a special token that is its prefix.
        ordered = sorted(specials, key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def protect(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], "_Sentinels"]:
        """The messages with every special-token string in their text swapped for a sentinel."""
        sentinels = _Sentinels()
        if self._specials is None:
            return messages, sentinels
        return [self._swap(message, sentinels) for message in messages], sentinels

    def encode(self, text: str, sentinels: "_Sentinels") -> list[int]:
        """Token ids of a rendered prompt: sentinels become their strings encoded as text."""
        if not sentinels.originals:
            return self._tokenizer.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for index, piece in enumerate(sentinels.pattern.split(text)):
            if index % 2:  # a captured sentinel number
                ids.extend(self._tokenizer.encode_as_text(sentinels.originals[int(piece)]))
            elif piece:
                ids.extend(self._tokenizer.encode(piece, add_special_tokens=False))
        return ids

    def restore(self, chat: RenderedChat, sentinels: "_Sentinels") -> RenderedChat:
        """The rendered chat with its text as the client wrote it (the ids are already right)."""
        if not sentinels.originals:
            return chat
        text = sentinels.pattern.sub(lambda m: sentinels.originals[int(m.group(1))], chat.text)
        return RenderedChat(text, chat.token_ids)

    def _swap(self, value: Any, sentinels: "_Sentinels") -> Any:
        assert self._specials is not None
        if isinstance(value, str):
            return self._specials.sub(lambda m: sentinels.add(m.group(0)), value)
        if isinstance(value, dict):
            return {key: value[key] if key == "role" else self._swap(value[key], sentinels) for key in value}
        if isinstance(value, list):
            return [self._swap(item, sentinels) for item in value]
        return value


class _Sentinels:
    """The special-token strings one request's messages held, each behind a numbered sentinel."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(8)
        self.originals: list[str] = []
        self.pattern = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")

    def add(self, original: str) -> str:
        self.originals.append(original)
        return f"\ue000{self.nonce}:{len(self.originals) - 1}\ue001"
