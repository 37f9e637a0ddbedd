"""Hermes format (NousResearch Hermes, Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Any number of blocks, anywhere in the message; text outside them is content. A block is the text up to
the first `</tool_call>`; when what lies between the tags is not exactly one call object, the block
(tags included) is content and the other blocks still count.
"""

from __future__ import annotations

from tokenmill.server.tool_parsers.base import IdFactory, ToolParser
from tokenmill.server.tool_parsers.json_scan import WHITESPACE
from tokenmill.server.tool_parsers.streamer import ToolCallStreamer, partial_suffix

START = "<tool_call>"
END = "</tool_call>"


class HermesStreamer(ToolCallStreamer):
    def __init__(self, id_factory: IdFactory | None = None, stream_arguments: bool = True) -> None:
        super().__init__(id_factory, stream_arguments)
        # content | block (inside a block) | skip (rest of a malformed block whose call already went out)
        self._state = "content"
        # Inside a block: before | object | after | bad (the syntax around the call object).
        self._syntax = "before"

    def _process(self, final: bool) -> None:
        while self._buf:
            if self._state == "content":
                start = self._buf.find(START)
                if start < 0:
                    keep = 0 if final else partial_suffix(self._buf, START)
                    self._content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                self._content(self._buf[:start])
                self._buf = self._buf[start + len(START) :]
                self._begin_region(START)
                self._state, self._syntax = "block", "before"
                continue
            end = self._buf.find(END)
            if end < 0:
                keep = 0 if final else partial_suffix(self._buf, END)
                self._block_text(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            self._block_text(self._buf[: end + len(END)], closing=True)
            self._buf = self._buf[end + len(END) :]
        if final and self._state != "content":
            if self._in_region:
                self._end_region_bad()  # no closing tag: the block was cut off
            self._state = "content"

    def _block_text(self, text: str, closing: bool = False) -> None:
        """Text inside a block; with `closing`, it ends with the closing tag."""
        body = text[: -len(END)] if closing else text
        if self._state == "skip":
            pass  # the rest of a block whose call was already sent: it belongs to no message part
        elif self._syntax == "bad":
            self._content(text)  # the block already turned out to be content
        else:
            self._region_text(text)
            for ch in body:
                self._syntax_char(ch)
                if self._syntax == "bad":
                    # Everything of this block so far, this piece included, is now settled as content.
                    self._state = "skip" if self._end_region_bad() else "block"
                    break
            if closing and self._in_region:
                if self._syntax == "after":
                    self._end_region_ok()
                else:
                    self._state = "skip" if self._end_region_bad() else "block"
        if closing:
            self._state = "content"

    def _syntax_char(self, ch: str) -> None:
        if self._syntax == "object":
            status = self._scan(ch)
            if status == "error":
                self._syntax = "bad"
            elif status == "done":
                self._syntax = "after"
        elif ch in WHITESPACE:
            return
        elif self._syntax == "before" and ch == "{":
            self._start_call()
            self._syntax = "object"
            self._scan(ch)
        else:
            self._syntax = "bad"


class HermesToolParser(ToolParser):
    name = "hermes"

    def new_streamer(self, id_factory: IdFactory | None = None, stream_arguments: bool = True) -> ToolCallStreamer:
        return HermesStreamer(id_factory, stream_arguments)
