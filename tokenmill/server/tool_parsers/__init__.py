"""Tool calling for the OpenAI-compatible server: read a model's tool-call text back into `tool_calls`.

Standard library only, so it imports without fastapi or pydantic. One parser per model family's
output format, chosen by name (`get_tool_parser`) or guessed from the chat template
(`detect_tool_parser`); `schema` validates `tools` / `tool_choice` and builds the JSON schema that forces
a call when tool_choice is "required" or names a function.
"""

from __future__ import annotations

from tokenmill.server.tool_parsers.base import (
    IdFactory,
    ParsedToolCalls,
    ToolCall,
    ToolParser,
    collect_fragments,
    fragments_for_calls,
    new_tool_call_id,
)
from tokenmill.server.tool_parsers.hermes import HermesToolParser
from tokenmill.server.tool_parsers.llama3_json import Llama3JsonToolParser
from tokenmill.server.tool_parsers.mistral import MistralToolParser
from tokenmill.server.tool_parsers.streamer import ToolCallStreamer

_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
    MistralToolParser.name: MistralToolParser,
}

TOOL_PARSERS: tuple[str, ...] = tuple(_PARSERS)


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered under `name`; an unknown name raises ValueError listing the choices."""
    try:
        return _PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; choose one of: {', '.join(TOOL_PARSERS)}") from None


def detect_tool_parser(chat_template: str | None) -> str | None:
    """Guess the parser from the markers a chat template teaches the model; None when it shows no tools."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HermesToolParser.name
    if "[TOOL_CALLS]" in chat_template:
        return MistralToolParser.name
    if "<|python_tag|>" in chat_template or ("<|eom_id|>" in chat_template and "parameters" in chat_template):
        return Llama3JsonToolParser.name
    return None


__all__ = [
    "TOOL_PARSERS",
    "IdFactory",
    "ParsedToolCalls",
    "ToolCall",
    "ToolCallStreamer",
    "ToolParser",
    "collect_fragments",
    "detect_tool_parser",
    "fragments_for_calls",
    "get_tool_parser",
    "new_tool_call_id",
]
