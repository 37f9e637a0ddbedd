"""Character-by-character scanner for one tool-call object: {"name": "...", "arguments": {...}}.

It follows only the object's top level (keys, colons, commas) and the nesting of strings and brackets
below it, which is enough to know, while the text is still arriving, the call's name and which characters
belong to the arguments value. Full JSON validity is checked with `json.loads` once the object closes.

The arguments of a call are, canonically, the JSON text of the arguments object exactly as the model
wrote it (so streamed pieces can be sent as they arrive and still add up to the final value). When the
model wrote the arguments as a JSON string, its decoded value is used; a missing or null value is "{}".
"""

from __future__ import annotations

import json
from typing import Any

ARGUMENT_KEYS = ("arguments", "parameters")
WHITESPACE = " \t\n\r"
_CLOSER = {"{": "}", "[": "]"}
_SCALAR_START = "-0123456789tfn"


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity by default; clients' JSON parsers do not.
    raise ValueError(f"{name} is not valid JSON")


def strict_loads(text: str) -> Any:
    """json.loads that rejects NaN/Infinity, so what we accept every JSON client can read back."""
    return json.loads(text, parse_constant=_reject_constant)


class CallObjectScanner:
    """Scans one call object. Feed it characters starting at the object's "{" until `done` or `error`.

    `feed_char` returns the events the character produced: ("name", name) once the name is known and the
    arguments have begun (so a JSON answer that merely has a "name" field is not announced as a call
    before its end), and ("args", piece) for text of the canonical arguments. "args" events come before
    "name" when the model wrote the arguments first. With `require_arguments`, an object without an
    arguments key is not a call.
    """

    def __init__(self, require_arguments: bool = False) -> None:
        self._require_arguments = require_arguments
        self._args_seen = False
        self._name_sent = False
        self._chars: list[str] = []
        self._closers: list[str] = []  # expected closing brackets, outermost first
        self._in_string = False
        self._escape = False
        # Top-level slot of the object: key | colon | value | scalar | after.
        self._slot = "key"
        self._after_comma = False
        self._key_start = 0
        self._key = ""
        self._keys: set[str] = set()
        self._value_start = 0
        self._value_is_string = False
        self._streaming_args = False
        self.name: str | None = None
        self.arguments: str | None = None
        self.done = False
        self.error: str | None = None

    def feed_char(self, ch: str) -> list[tuple[str, str]]:
        if self.done or self.error is not None:
            raise RuntimeError("the call object already ended")
        events: list[tuple[str, str]] = []
        self._chars.append(ch)
        if not self._closers:
            if ch == "{":
                self._closers.append("}")
            else:
                self.error = "a tool call must be a JSON object"
            return events
        if self._in_string:
            self._string_char(ch, events)
        elif len(self._closers) > 1:
            self._nested_char(ch, events)
        else:
            self._top_char(ch, events)
        return events

    def _string_char(self, ch: str, events: list[tuple[str, str]]) -> None:
        if self._streaming_args:
            events.append(("args", ch))
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self._in_string = False
            if len(self._closers) == 1:
                self._top_string_closed(events)

    def _nested_char(self, ch: str, events: list[tuple[str, str]]) -> None:
        if self._streaming_args:
            events.append(("args", ch))
        if ch == '"':
            self._in_string = True
        elif ch in _CLOSER:
            self._closers.append(_CLOSER[ch])
        elif ch in "}]":
            if ch != self._closers[-1]:
                self.error = f"mismatched {ch!r}"
                return
            self._closers.pop()
            if len(self._closers) == 1:
                self._streaming_args = False
                self._value_done(len(self._chars), events)

    def _top_char(self, ch: str, events: list[tuple[str, str]]) -> None:
        if self._slot == "scalar":
            if ch not in WHITESPACE and ch not in ",}":
                return  # a number or literal goes on; json.loads checks its spelling at the end
            self._value_done(len(self._chars) - 1, events)
        if ch in WHITESPACE or self.error is not None:
            return
        slot = self._slot
        if slot == "key":
            if ch == '"':
                self._in_string, self._key_start = True, len(self._chars) - 1
            elif ch == "}" and not self._after_comma:
                self._close_object(events)
            else:
                self.error = "expected a key"
        elif slot == "colon":
            if ch == ":":
                self._slot = "value"
            else:
                self.error = "expected ':'"
        elif slot == "value":
            self._start_value(ch, events)
        elif ch == ",":
            self._slot, self._after_comma = "key", True
        elif ch == "}":
            self._close_object(events)
        else:
            self.error = "expected ',' or '}'"

    def _start_value(self, ch: str, events: list[tuple[str, str]]) -> None:
        self._value_start = len(self._chars) - 1
        self._value_is_string = ch == '"'
        is_args = self._key in ARGUMENT_KEYS
        if is_args:
            self._args_seen = True
            self._send_name(events)
        if ch == '"':
            self._in_string = True
        elif ch in _CLOSER:
            if is_args and ch == "[":
                self.error = "arguments must be a JSON object"
                return
            self._closers.append(_CLOSER[ch])
            if is_args:
                self._streaming_args = True
                events.append(("args", ch))
        elif ch in _SCALAR_START:
            self._slot = "scalar"
        else:
            self.error = "expected a value"

    def _top_string_closed(self, events: list[tuple[str, str]]) -> None:
        if self._slot == "key":
            try:
                key = strict_loads("".join(self._chars[self._key_start :]))
            except ValueError:
                self.error = "invalid key"
                return
            duplicate = key in self._keys or (key in ARGUMENT_KEYS and self._keys.intersection(ARGUMENT_KEYS))
            if duplicate:
                self.error = f"duplicate key {key!r}"
                return
            self._key = key
            self._keys.add(key)
            self._slot, self._after_comma = "colon", False
        else:
            self._value_done(len(self._chars), events)

    def _value_done(self, end: int, events: list[tuple[str, str]]) -> None:
        """A top-level value ended at character `end` (exclusive): interpret it when it is name or arguments."""
        self._slot = "after"
        raw = "".join(self._chars[self._value_start : end])
        if self._key == "name":
            name = self._decode_string(raw)
            if name is not None and not name:
                self.error = "the function name is empty"
            elif name is not None:
                self.name = name
                if self._args_seen:
                    self._send_name(events)
            elif self.error is None:
                self.error = "the function name must be a string"
        elif self._key in ARGUMENT_KEYS:
            if raw.startswith("{"):
                self.arguments = raw  # its characters already went out as "args" events
            elif self._value_is_string:
                decoded = self._decode_string(raw)
                if decoded is not None:
                    self.arguments = decoded
                    events.append(("args", decoded))
            elif raw == "null":
                self.arguments = "{}"
                events.append(("args", "{}"))
            else:
                self.error = "arguments must be a JSON object"

    def _send_name(self, events: list[tuple[str, str]]) -> None:
        if self.name is not None and not self._name_sent:
            self._name_sent = True
            events.append(("name", self.name))

    def _decode_string(self, raw: str) -> str | None:
        if not self._value_is_string:
            return None
        try:
            value = strict_loads(raw)
        except ValueError:
            self.error = "invalid JSON string"
            return None
        return value

    def _close_object(self, events: list[tuple[str, str]]) -> None:
        self._closers.pop()
        self.done = True
        try:
            parsed = strict_loads("".join(self._chars))
        except ValueError as exc:
            self.error = f"invalid JSON: {exc}"
            return
        if not isinstance(parsed, dict) or self.name is None:
            self.error = "a tool call needs a string 'name'"
            return
        if self._require_arguments and not self._args_seen:
            self.error = "a tool call needs 'arguments' or 'parameters'"
            return
        self._send_name(events)
        if self.arguments is None:
            self.arguments = "{}"
            events.append(("args", "{}"))
