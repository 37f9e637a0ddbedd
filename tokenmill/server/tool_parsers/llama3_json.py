"""Llama 3.1 / 3.2 JSON format: the whole message is `{"name": ..., "parameters": {...}}`.

Optionally preceded by `<|python_tag|>`; several calls are separated by ";". "arguments" is accepted in
place of "parameters", and an object without either is not a call (so a JSON answer such as
{"name": "Ada", "age": 36} stays content). When the message, after leading whitespace, starts with
anything else, or when any part of it breaks the syntax, the whole message is content.

`<|python_tag|>` is a special token: with skip_special_tokens=True it is removed from the text, which is
fine, since a message that starts with "{" is read the same way.
"""

from __future__ import annotations

from tokenmill.server.tool_parsers.base import IdFactory, ToolParser
from tokenmill.server.tool_parsers.json_scan import WHITESPACE
from tokenmill.server.tool_parsers.streamer import ToolCallStreamer

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonStreamer(ToolCallStreamer):
    require_arguments = True

    def __init__(self, id_factory: IdFactory | None = None, stream_arguments: bool = True) -> None:
        super().__init__(id_factory, stream_arguments)
        # start | calls | content (the message is plain text) | drop (broken after calls went out)
        self._state = "start"
        # Inside the calls: before | object | after | next | bad.
        self._syntax = "before"

    def _process(self, final: bool) -> None:
        if self._state == "start":
            self._decide_start(final)
        if self._state == "content":
            self._content(self._buf)
            self._buf = ""
        elif self._state == "drop":
            self._buf = ""
        elif self._state == "calls":
            self._calls_text()
            if final and self._state == "calls":
                if self._syntax in ("after", "next"):
                    self._end_region_ok()
                    self._state = "content"
                else:
                    self._state = "drop" if self._end_region_bad() else "content"

    def _decide_start(self, final: bool) -> None:
        """Leading whitespace aside, does the message open like a call? Waits while it cannot tell."""
        body = self._buf.lstrip(WHITESPACE)
        self._content(self._buf[: len(self._buf) - len(body)])  # held: whitespace is never emitted alone
        self._buf = body
        if body.startswith(PYTHON_TAG):
            self._begin_region(PYTHON_TAG)
            self._buf = body[len(PYTHON_TAG) :]
            self._state = "calls"
        elif body.startswith("{"):
            self._begin_region("")
            self._state = "calls"
        elif body and (final or not PYTHON_TAG.startswith(body)):
            self._state = "content"

    def _calls_text(self) -> None:
        for pos, ch in enumerate(self._buf):
            self._syntax_char(ch)
            if self._syntax == "bad":
                # The message is not a call list after all: all of it is content (or dropped, if sent).
                self._region_text(self._buf[: pos + 1])
                rest = self._buf[pos + 1 :]
                self._buf = ""
                if self._end_region_bad():
                    self._state = "drop"
                else:
                    self._state = "content"
                    self._content(rest)
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
        elif syntax in ("before", "next") and ch == "{":
            self._start_call()
            self._syntax = "object"
            self._scan(ch)
        elif syntax == "after" and ch == ";":
            self._syntax = "next"
        else:
            self._syntax = "bad"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def new_streamer(self, id_factory: IdFactory | None = None, stream_arguments: bool = True) -> ToolCallStreamer:
        return Llama3JsonStreamer(id_factory, stream_arguments)
