"""Tool-call value types, OpenAI delta fragments, and the parser interface shared by every format.

Pure Python (json only): the chat endpoint imports it, but so can tests and offline tools that have no
fastapi or pydantic installed.
"""

from __future__ import annotations

import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from tokenmill.server.tool_parsers.streamer import ToolCallStreamer

IdFactory = Callable[[], str]

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """An OpenAI-style call id: "call_" and 24 random letters or digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made. `arguments` is a JSON text, as OpenAI returns it."""

    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_openai(self) -> dict[str, Any]:
        """The entry of `choices[i].message.tool_calls`."""
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedToolCalls:
    """A finished message split into its answer text and its tool calls.

    `content` is None when the message made tool calls and had no other text; without tool calls it is
    the model's text, unchanged.
    """

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


def content_fragment(text: str) -> dict[str, Any]:
    return {"content": text}


def header_fragment(index: int, call_id: str, name: str) -> dict[str, Any]:
    """The first delta of a call: its id and name, with empty arguments (OpenAI streams them next)."""
    return {
        "tool_calls": [
            {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        ]
    }


def arguments_fragment(index: int, piece: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


def fragments_for_calls(calls: Iterable[ToolCall], first_index: int = 0) -> list[dict[str, Any]]:
    """Deltas that stream already-complete calls (e.g. the output of a forced tool choice) in one go."""
    fragments: list[dict[str, Any]] = []
    for offset, call in enumerate(calls):
        fragments.append(header_fragment(first_index + offset, call.id, call.name))
        if call.arguments:
            fragments.append(arguments_fragment(first_index + offset, call.arguments))
    return fragments


def collect_fragments(fragments: Iterable[dict[str, Any]]) -> ParsedToolCalls:
    """Reassemble streamed deltas into the message they describe (what a client does with the stream)."""
    content: list[str] = []
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for fragment in fragments:
        if "content" in fragment:
            content.append(fragment["content"])
        for delta in fragment.get("tool_calls", []):
            index = delta["index"]
            if "id" in delta:
                ids[index] = delta["id"]
                names[index] = delta["function"]["name"]
            arguments.setdefault(index, []).append(delta["function"].get("arguments", ""))
    calls = [ToolCall(ids[i], names[i], "".join(arguments[i])) for i in sorted(ids)]
    text = "".join(content)
    return ParsedToolCalls(text if text or not calls else None, calls)


class ToolParser(ABC):
    """One model family's tool-call format. Stateless: every response gets its own streamer."""

    name: ClassVar[str]

    @abstractmethod
    def new_streamer(self, id_factory: IdFactory | None = None, stream_arguments: bool = True) -> ToolCallStreamer:
        """A streamer for one choice of one response; see ToolCallStreamer for `stream_arguments`."""

    def parse(self, text: str, id_factory: IdFactory | None = None) -> ParsedToolCalls:
        """Split a finished message. Never raises: text that is not a well-formed call stays content.

        Runs the streamer in its hold-back mode over the whole text, so the streamed and non-streamed
        results cannot drift apart: they are the same state machine.
        """
        streamer = self.new_streamer(id_factory, stream_arguments=False)
        return collect_fragments(streamer.feed(text) + streamer.finish())
