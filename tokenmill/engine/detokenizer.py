"""Incremental detokenization with stop strings.

Text is decoded with the prefix/read-offset technique: each update decodes a small window of recent
tokens twice (up to the read offset, and up to the end) and emits only the new suffix. Decoding a window
rather than single tokens keeps decoders that look at neighbours (sentencepiece's leading-space strip,
byte-fallback runs, byte-level BPE) exact, and keeps the cost per update O(new tokens).

The text a request produces is defined as `tokenizer.decode(output_ids, skip_special_tokens=...)` (what
transformers users compare against), truncated at the first stop string. For any split of the ids into
updates, the concatenated deltas equal that text.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenmill.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# After this many undecodable pending tokens we stop waiting for a character to complete: the model is
# producing invalid bytes, and holding them forever would make each update O(total).
_MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    """Turns a request's output ids into text deltas; stops at the first stop string."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        # The output text does not depend on the prompt: it is decode(output ids), as transformers users
        # see it (e.g. sentencepiece strips the first output token's leading space). Kept for callers.
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        stops = [stop] if isinstance(stop, str) else list(stop)  # a bare string is one stop, not its characters
        self.stop = [s for s in stops if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_reason: str | None = None

        self._byte_ids = tokenizer.byte_fallback_ids
        self._ids: list[int] = []  # output ids that reach the text (skipped specials are dropped here)
        self._prefix = 0  # start of the decode window: a clean character boundary
        self._read = 0  # ids before this have been turned into text
        self._prefix_text = ""  # decode(ids[prefix:read]), cached between updates
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._held = ""  # decoded text held back because it may be the start of a stop string
        self._out: list[str] = []
        self._out_cache: str | None = ""
        self._done = False  # a stop string matched, or flush() was called

    # ---- public ----------------------------------------------------------------------------------------

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Add sampled ids; return the text that became final (may be "")."""
        if self._done:
            return ""
        skip = self.skip_special_tokens
        for token_id in new_token_ids:
            if skip and self.tokenizer.is_skipped_special(token_id):
                continue  # dropping them here keeps every decode window free of skipped tokens
            self._ids.append(token_id)
        return self._release(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """The request finished for another reason: release everything still held back."""
        if self._done:
            return ""
        text = self._release(self._decode_new(final=True), final=True)
        self._done = True
        return text

    @property
    def output_text(self) -> str:
        """All text released so far."""
        if self._out_cache is None:
            self._out_cache = "".join(self._out)
            self._out = [self._out_cache]
        return self._out_cache

    @property
    def finished(self) -> bool:
        return self._done

    # ---- decoding --------------------------------------------------------------------------------------

    def _decode_new(self, final: bool) -> str:
        """Decode the ids after the read offset; return the part of their text that is final."""
        ids, n, read = self._ids, len(self._ids), self._read
        if n == read:
            return ""
        if final:
            return self._advance(n, self._decode(self._prefix, n))
        end = n
        if self._byte_ids and ids[-1] in self._byte_ids:
            # Byte-fallback decoders turn a whole run of <0xNN> tokens into U+FFFD when any byte of it is
            # invalid, so text inside an unfinished run may still change: release only up to the run.
            end = n - 1
            while end > read and ids[end - 1] in self._byte_ids:
                end -= 1
            if end == read:
                if n - read < _MAX_PENDING_TOKENS:
                    return ""
                end = n  # a very long run: release at character boundaries instead
        # A text ending in U+FFFD ends with a partial character (its other bytes are still to come);
        # it spans at most the last 3 tokens, so one of the boundaries just before them is clean.
        for k in range(end, max(read, end - 4), -1):
            text = self._decode(self._prefix, k)
            if not text.endswith(_REPLACEMENT):
                return self._advance(k, text)
        if n - read >= _MAX_PENDING_TOKENS:
            return self._advance(n, self._decode(self._prefix, n))  # invalid bytes: stop waiting
        return ""

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _advance(self, end: int, window_text: str) -> str:
        """Release decode(ids[prefix:end]) past the already-released prefix; slide the window forward."""
        delta = window_text[len(self._prefix_text):]
        self._prefix, self._read = self._read, end
        self._prefix_text = self._decode(self._prefix, end)
        return delta

    # ---- stop strings ----------------------------------------------------------------------------------

    def _release(self, text: str, final: bool) -> str:
        if not self.stop:
            return self._emit(text)
        buf = self._held + text
        match = self._first_stop(buf)
        if match is not None:
            start, stop = match
            self.stop_reason = stop
            self._done = True
            self._held = ""
            return self._emit(buf[: start + len(stop)] if self.include_stop_str_in_output else buf[:start])
        hold = 0 if final else self._partial_stop_len(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return self._emit(buf[: len(buf) - hold])

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        """The stop string that completes first in buf (ties: the longer one), as (start, stop)."""
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for stop in self.stop:
            idx = buf.find(stop)
            if idx >= 0:
                key = (idx + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._max_stop - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self, text: str) -> str:
        if text:
            self._out.append(text)
            self._out_cache = None
        return text
