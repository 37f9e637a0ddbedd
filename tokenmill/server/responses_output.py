"""A response's output items, built from the model's text as it arrives, with the stream events that go with them.

One builder serves both paths: a non-streamed response is the same text fed in one piece and its events
dropped, so the streamed and the returned output cannot differ. Items come in the order the text made them:
a reasoning item (the thinking section), message items (answer text) and function_call items (tool calls,
from the chat path's tool streamer), each opened, written and closed as OpenAI's stream describes:

  output_item.added, content_part.added, output_text.delta..., output_text.done, content_part.done,
  output_item.done (reasoning: reasoning_text.delta / .done; a call: function_call_arguments.delta / .done).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

Event = dict[str, Any]
# The text part each text item holds, and the names of its delta and done events.
_PARTS = {
    "message": ({"type": "output_text", "text": "", "annotations": []}, "response.output_text"),
    "reasoning": ({"type": "reasoning_text", "text": ""}, "response.reasoning_text"),
}


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """The output list of one response. `reasoning(text)` and `content(fragments)` return the events their text
    makes; `finish(incomplete)` closes the last item. Whitespace that would open a new message (between a
    call and the end, say) is held until real text follows and dropped if none does, unless the response
    would otherwise have no message and no call: then it is the message (an empty one for an empty answer,
    none when the output was cut off inside the thinking section)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._held = ""
        self._calls: dict[int, dict[str, Any]] = {}  # the tool streamer's call index -> its item

    @property
    def text(self) -> str:
        """The answer text: every message's output_text, as the client's `output_text` joins it."""
        return "".join(part["text"] for item in self.items if item["type"] == "message" for part in item["content"])

    def reasoning(self, text: str) -> list[Event]:
        if not text:
            return []
        events = [] if self._is_open("reasoning") else self._start({"type": "reasoning", "summary": [], "content": []})
        return events + self._write_text(text)

    def content(self, fragments: list[dict[str, Any]]) -> list[Event]:
        """Fragments as the chat path's tool streamer makes them: {"content": text}, or a call's header
        {"tool_calls": [{"index", "id", "function": {"name"}}]} then its {"tool_calls": [{"index", "function":
        {"arguments": piece}}]}."""
        events: list[Event] = []
        for fragment in fragments:
            if "content" in fragment:
                events += self._content_text(fragment["content"] or "")
            for delta in fragment.get("tool_calls", []):
                events += self._tool_call(delta)
        return events

    def finish(self, incomplete: bool) -> list[Event]:
        events: list[Event] = []
        answered = any(item["type"] in ("message", "function_call") for item in self.items)
        if not answered and (self._held or not incomplete):  # cut off while thinking: no empty message
            if not self._is_open("message"):
                events += self._start({"type": "message", "role": "assistant", "content": []})
            events += self._write_text(self._held)
        self._held = ""
        return events + self._close("incomplete" if incomplete else "completed")

    # ---- items -------------------------------------------------------------------------------------------

    def _is_open(self, kind: str) -> bool:
        return self._open is not None and self._open["type"] == kind

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _start(self, item: dict[str, Any]) -> list[Event]:
        events = self._close("completed")
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[item["type"]]
        item = {"id": item_id(prefix), **item, "status": "in_progress"}
        self.items.append(item)
        self._open = item
        events.append({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                       "item": copy.deepcopy(item)})
        if item["type"] in _PARTS:
            part = dict(_PARTS[item["type"]][0])
            item["content"].append(part)
            events.append({"type": "response.content_part.added", **self._where(), "content_index": 0,
                           "part": copy.deepcopy(part)})
        return events

    def _write_text(self, text: str) -> list[Event]:
        if not text:
            return []
        assert self._open is not None
        self._open["content"][0]["text"] += text
        name = _PARTS[self._open["type"]][1]
        extra = {"logprobs": []} if self._open["type"] == "message" else {}
        return [{"type": f"{name}.delta", **self._where(), "content_index": 0, "delta": text, **extra}]

    def _content_text(self, text: str) -> list[Event]:
        if self._is_open("message"):
            return self._write_text(text)
        self._held += text
        if not self._held.strip():
            return []
        text, self._held = self._held, ""
        return self._start({"type": "message", "role": "assistant", "content": []}) + self._write_text(text)

    def _tool_call(self, delta: dict[str, Any]) -> list[Event]:
        function = delta.get("function") or {}
        if "id" in delta:  # a call's header opens its item
            self._held = ""
            events = self._start({"type": "function_call", "call_id": delta["id"], "name": function.get("name", ""),
                                  "arguments": ""})
            self._calls[delta["index"]] = self._open  # type: ignore[assignment]
            return events
        piece = function.get("arguments") or ""
        item = self._calls[delta["index"]]
        if not piece:
            return []
        item["arguments"] += piece
        return [{"type": "response.function_call_arguments.delta", "item_id": item["id"],
                 "output_index": self.items.index(item), "delta": piece}]

    def _close(self, status: str) -> list[Event]:
        item = self._open
        if item is None:
            return []
        events: list[Event] = []
        where = self._where()
        if item["type"] in _PARTS:
            part = item["content"][0]
            extra = {"logprobs": []} if item["type"] == "message" else {}
            events.append({"type": f"{_PARTS[item['type']][1]}.done", **where, "content_index": 0,
                           "text": part["text"], **extra})
            events.append({"type": "response.content_part.done", **where, "content_index": 0,
                           "part": copy.deepcopy(part)})
        else:
            events.append({"type": "response.function_call_arguments.done", **where, "name": item["name"],
                           "arguments": item["arguments"]})
        item["status"] = status
        self._open = None
        events.append({"type": "response.output_item.done", "output_index": where["output_index"],
                       "item": copy.deepcopy(item)})
        return events
