"""The streaming half of tool-call parsing: text deltas in, OpenAI `choices[i].delta` fragments out.

A format subclass reads its markers and the syntax around the call objects; this base class owns what
is common: content emission, the ids and indices of calls, and the choice between streaming arguments
as they arrive and holding a call back until its whole region has proved well-formed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tokenmill.server.tool_parsers.base import (
    IdFactory,
    arguments_fragment,
    content_fragment,
    header_fragment,
    new_tool_call_id,
)
from tokenmill.server.tool_parsers.json_scan import WHITESPACE, CallObjectScanner


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (text to hold back)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


@dataclass
class _Call:
    """A call seen inside the current region; `index` is set once its header has gone out."""

    scanner: CallObjectScanner
    name: str | None = None
    pending_args: list[str] = field(default_factory=list)
    index: int | None = None


class ToolCallStreamer(ABC):
    """Per-choice state. `feed(delta)` and `finish()` return the fragments that go into `choices[i].delta`.

    A *region* is the stretch of text a format reserves for calls (one `<tool_call>` block, a
    `[TOOL_CALLS]` list, a whole Llama message). If a region turns out malformed or unterminated, its raw
    text is content, exactly as `ToolParser.parse` reports it.

    With `stream_arguments=False` every region is held back until it is complete and well-formed, so the
    stream always adds up to `parse()` of the same text. With `stream_arguments=True` (default) a call's
    header goes out as soon as its name is known and its arguments as they arrive; the stream still adds
    up to `parse()` unless a call that already started turns out truncated (e.g. max_tokens) or malformed.
    Such calls cannot be taken back: they stay with the arguments sent so far, the indices of every call
    sent from that region are listed in `unfinished_calls` (parse() has the region as content), and the
    rest of the region is dropped.

    Whitespace-only content next to tool calls is noise: a run of whitespace is held until more text
    shows it is inside the answer; a call drops it, and so does the end of a message that made calls.
    """

    # Formats whose calls are bare JSON objects need the arguments key to tell a call from a JSON answer.
    require_arguments = False

    def __init__(self, id_factory: IdFactory | None = None, stream_arguments: bool = True) -> None:
        self._new_id = id_factory or new_tool_call_id
        self._incremental = stream_arguments
        self._out: list[dict[str, Any]] = []
        self._buf = ""
        self._held_ws = ""
        self._next_index = 0
        self._finished = False
        self._region_raw: list[str] | None = None
        self._region_calls: list[_Call] = []
        self.unfinished_calls: list[int] = []

    # ----- public API -----

    def feed(self, delta_text: str) -> list[dict[str, Any]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        self._process(final=False)
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        """The generation ended: flush held text; an open region is judged as it stands."""
        if not self._finished:
            self._finished = True
            self._process(final=True)
            if self._next_index == 0:
                self._out_content(self._held_ws)
            self._held_ws = ""
        return self._take()

    @property
    def tool_call_count(self) -> int:
        """Calls whose header has been streamed (including unfinished ones)."""
        return self._next_index

    @property
    def has_tool_calls(self) -> bool:
        """A call from a complete, well-formed region went out: finish_reason should be "tool_calls"."""
        return self._next_index > len(self.unfinished_calls)

    # ----- for format subclasses -----

    @abstractmethod
    def _process(self, final: bool) -> None:
        """Consume `self._buf` as far as it can be decided; with `final`, all of it."""

    def _content(self, text: str) -> None:
        """Answer text outside any region."""
        if not text:
            return
        if text.strip(WHITESPACE):
            stripped = text.rstrip(WHITESPACE)
            self._out_content(self._held_ws + stripped)
            self._held_ws = text[len(stripped) :]
        else:
            self._held_ws += text

    def _begin_region(self, marker: str) -> None:
        self._region_raw = [marker]
        self._region_calls = []

    @property
    def _in_region(self) -> bool:
        return self._region_raw is not None

    def _region_text(self, text: str) -> None:
        """Raw text of the open region, kept so that a malformed region can become content."""
        assert self._region_raw is not None
        self._region_raw.append(text)

    def _start_call(self) -> None:
        self._region_calls.append(_Call(CallObjectScanner(self.require_arguments)))

    def _scan(self, ch: str) -> str:
        """Give one character to the current call object: returns "more", "done" or "error"."""
        call = self._region_calls[-1]
        for kind, value in call.scanner.feed_char(ch):
            if kind == "name":
                call.name = value
                if self._incremental:
                    self._send_header(call)
            elif call.index is not None:
                self._out_arguments(call.index, value)
            else:
                call.pending_args.append(value)
        if call.scanner.error is not None:
            return "error"
        return "done" if call.scanner.done else "more"

    def _region_committed(self) -> bool:
        """True when part of the open region already went out as tool calls (only when streaming arguments)."""
        return any(call.index is not None for call in self._region_calls)

    def _end_region_ok(self) -> None:
        """The region is complete and well-formed: send whatever of its calls is still held."""
        for call in self._region_calls:
            if call.index is None:
                self._send_header(call)
        self._region_raw = None
        self._region_calls = []

    def _end_region_bad(self) -> bool:
        """The region is malformed or cut off. Returns True when calls from it were already sent."""
        assert self._region_raw is not None
        committed = self._region_committed()
        if committed:
            self.unfinished_calls.extend(call.index for call in self._region_calls if call.index is not None)
        else:
            self._content("".join(self._region_raw))
        self._region_raw = None
        self._region_calls = []
        return committed

    # ----- output -----

    def _send_header(self, call: _Call) -> None:
        assert call.name is not None
        call.index = self._next_index
        self._next_index += 1
        self._held_ws = ""  # whitespace between the answer text and a call is not part of the answer
        self._out.append(header_fragment(call.index, self._new_id(), call.name))
        if call.pending_args:
            self._out_arguments(call.index, "".join(call.pending_args))
            call.pending_args = []

    def _out_content(self, text: str) -> None:
        if not text:
            return
        if self._out and "content" in self._out[-1]:
            self._out[-1]["content"] += text
        else:
            self._out.append(content_fragment(text))

    def _out_arguments(self, index: int, piece: str) -> None:
        last = self._out[-1]["tool_calls"][0] if self._out and "tool_calls" in self._out[-1] else None
        if last is not None and last["index"] == index and "id" not in last:
            last["function"]["arguments"] += piece
        else:
            self._out.append(arguments_fragment(index, piece))

    def _take(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out
