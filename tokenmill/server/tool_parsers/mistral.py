"""Mistral format (Mistral 7B v0.3, Mixtral, Mistral Nemo/Small): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

Text before the marker is content. The list after the marker holds the calls; text after the list is
content again. A list that breaks the syntax becomes content up to the character that broke it, and
scanning goes on after it.

`[TOOL_CALLS]` is a special token in Mistral tokenizers: decode with skip_special_tokens=False (or keep
this token) or the marker never reaches the parser.
"""

from __future__ import annotations

from tokenmill.server.tool_parsers.base import IdFactory, ToolParser
from tokenmill.server.tool_parsers.json_scan import WHITESPACE
from tokenmill.server.tool_parsers.streamer import ToolCallStreamer, partial_suffix

MARKER = "[TOOL_CALLS]"


class MistralStreamer(ToolCallStreamer):
    def __init__(self, id_factory: IdFactory | None = None, stream_arguments: bool = True) -> None:
        super().__init__(id_factory, stream_arguments)
        # content | list (after the marker) | drop (after a broken list whose calls already went out)
        self._state = "content"
        # Inside the list: open (expects "[") | first | object | after | next | closed | bad.
        self._syntax = "open"

    def _process(self, final: bool) -> None:
        while self._buf:
            if self._state == "drop":
                self._buf = ""  # where a broken, already-sent list ends cannot be known
            elif self._state == "content":
                start = self._buf.find(MARKER)
                if start < 0:
                    keep = 0 if final else partial_suffix(self._buf, MARKER)
                    self._content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                self._content(self._buf[:start])
                self._buf = self._buf[start + len(MARKER) :]
                self._begin_region(MARKER)
                self._state, self._syntax = "list", "open"
            else:
                self._list_text()
        if final and self._state == "list":
            self._state = "drop" if self._end_region_bad() else "content"  # the list never closed

    def _list_text(self) -> None:
        """Consume list text from the buffer until the list closes, breaks, or the buffer runs out."""
        for pos, ch in enumerate(self._buf):
            self._syntax_char(ch)
            if self._syntax in ("closed", "bad"):
                self._region_text(self._buf[: pos + 1])
                self._buf = self._buf[pos + 1 :]
                if self._syntax == "closed":
                    self._end_region_ok()
                    self._state = "content"
                else:
                    self._state = "drop" if self._end_region_bad() else "content"
                return
        self._region_text(self._buf)
        self._buf = ""

    def _syntax_char(self, ch: str) -> None:
        syntax = self._syntax
        if syntax == "object":
            status = self._scan(ch)
            if status == "error":
                self._syntax = "bad"
            elif status == "done":
                self._syntax = "after"
        elif ch in WHITESPACE:
            return
        elif syntax == "open" and ch == "[":
            self._syntax = "first"
        elif syntax in ("first", "next") and ch == "{":
            self._start_call()
            self._syntax = "object"
            self._scan(ch)
        elif syntax == "after" and ch == ",":
            self._syntax = "next"
        elif syntax == "after" and ch == "]":
            self._syntax = "closed"
        else:
            self._syntax = "bad"


class MistralToolParser(ToolParser):
    name = "mistral"

    def new_streamer(self, id_factory: IdFactory | None = None, stream_arguments: bool = True) -> ToolCallStreamer:
        return MistralStreamer(id_factory, stream_arguments)
