"""Split a model's `<think>…</think>` section from its answer, for final texts and for streamed deltas.

Pure Python (no torch): the server uses it to fill `reasoning_content` and count reasoning tokens. The tags
are the engine's (`EngineConfig.thinking`), the same ones the engine derives thinking-budget ids from.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Protocol

from tokenmill.config import ThinkingConfig


class StreamingReasoningParser:
    """Fed text deltas, returns (reasoning_delta, content_delta); the tags themselves are never emitted.

    A tag may arrive split across deltas: any suffix that could be the start of a tag is held back until
    the next delta (or `finish`) decides it. `drop` lists extra strings removed from the output (used
    when special tokens had to stay in the text so that special-token tags are visible).
    """

    def __init__(self, config: ThinkingConfig, starts_in_reasoning: bool = False, drop: Sequence[str] = ()) -> None:
        self.config = config
        self.in_reasoning = starts_in_reasoning
        # The section opens at most once; after it closes everything is content.
        self.closed = False
        self.opened = starts_in_reasoning
        self._drop = [d for d in drop if d and d not in (config.start, config.end)]
        # Special tokens were kept only so the tags are visible: stray tags are dropped like the others.
        self._drop_stray_tags = bool(self._drop)
        self._buffer = ""
        self._saw_content = False  # non-whitespace answer text has been emitted

    def _markers(self) -> list[str]:
        markers = list(self._drop)
        if self._drop_stray_tags:
            return markers + [self.config.start, self.config.end]
        if self.in_reasoning:
            markers.append(self.config.end)
        elif not self.opened and not self._saw_content:
            # Only a tag that comes before any answer text opens reasoning ("Hi <think>" is content).
            markers.append(self.config.start)
        return markers

    def feed(self, delta: str) -> tuple[str, str]:
        self._buffer += delta
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            markers = self._markers()
            hit = _earliest(self._buffer, markers)
            if hit is None:
                break
            index, marker = hit
            self._emit(self._buffer[:index], reasoning, content)
            self._buffer = self._buffer[index + len(marker) :]
            stray_start = marker == self.config.start and (self.in_reasoning or self.opened or self._saw_content)
            stray_end = marker == self.config.end and not self.in_reasoning
            if stray_start or stray_end:
                if not self._drop_stray_tags:
                    self._emit(marker, reasoning, content)  # e.g. answer text came first: the tag is just text
            elif marker == self.config.end and self.in_reasoning:
                self.in_reasoning, self.closed = False, True
            elif marker == self.config.start and not self.in_reasoning and not self.opened:
                self.in_reasoning = self.opened = True
        keep = _longest_partial(self._buffer, self._markers())
        self._emit(self._buffer[: len(self._buffer) - keep], reasoning, content)
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The text ended: a held-back partial tag was just text after all."""
        reasoning: list[str] = []
        content: list[str] = []
        self._emit(self._buffer, reasoning, content)
        self._buffer = ""
        return "".join(reasoning), "".join(content)

    def _emit(self, text: str, reasoning: list[str], content: list[str]) -> None:
        if not text:
            return
        if self.in_reasoning:
            reasoning.append(text)
        else:
            content.append(text)
            self._saw_content = self._saw_content or bool(text.strip())


def parse_reasoning(
    text: str, config: ThinkingConfig, starts_in_reasoning: bool = False, drop: Sequence[str] = ()
) -> tuple[str, str]:
    """(reasoning_content, content) of a complete output text."""
    parser = StreamingReasoningParser(config, starts_in_reasoning, drop)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return r1 + r2, c1 + c2


class _TokenizerLike(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


def tokenizer_has_think_tokens(tokenizer: _TokenizerLike, config: ThinkingConfig) -> bool:
    """Both tags are single tokens of the vocabulary: the model was trained to think with them."""
    return tokenizer.token_to_id(config.start) is not None and tokenizer.token_to_id(config.end) is not None


def count_reasoning_tokens(token_ids: Sequence[int], end_tag_ids: Sequence[int], starts_in_reasoning: bool,
                           start_token_id: int | None) -> int:
    """Tokens inside the thinking section (tags excluded), counted on ids so no re-tokenization is needed."""
    counter = ReasoningTokenCounter(end_tag_ids, starts_in_reasoning, start_token_id)
    counter.feed(token_ids)
    return counter.count


class ReasoningTokenCounter:
    """count_reasoning_tokens fed ids as they stream, O(len(end tag)) per id: streamed usage needs no id list.

    The section opens at the first start token (or at once when the prompt opened it) and closes at the
    first complete end tag after that."""

    def __init__(self, end_tag_ids: Sequence[int], starts_in_reasoning: bool, start_token_id: int | None) -> None:
        self._end = list(end_tag_ids)
        self._start = start_token_id
        self._opened = starts_in_reasoning
        self._closed = False
        self._inside = 0  # ids since the section opened, the end tag's own included while it completes
        self._recent: collections.deque[int] = collections.deque(maxlen=max(len(self._end), 1))

    def feed(self, token_ids: Sequence[int]) -> None:
        for token_id in token_ids:
            if self._closed:
                return
            if not self._opened:
                self._opened = self._start is not None and token_id == self._start
                continue
            self._inside += 1
            self._recent.append(token_id)
            if self._end and len(self._recent) == len(self._end) and list(self._recent) == self._end:
                self._inside -= len(self._end)
                self._closed = True

    @property
    def count(self) -> int:
        return self._inside


def _earliest(text: str, markers: Sequence[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for marker in markers:
        index = text.find(marker)
        if index >= 0 and (best is None or index < best[0] or (index == best[0] and len(marker) > len(best[1]))):
            best = (index, marker)
    return best


def _longest_partial(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest
