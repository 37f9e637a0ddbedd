"""Responses input -> the chat path's inputs: items to chat messages, flat function tools to chat tools,
`text.format` to an output constraint.

The chat path owns every rule past the shape (tool names and schemas: tool_parsers/schema.py; the template:
engine/chat_template.py; schemas: structured/params.py); this file only reads the Responses shapes and names
their fields in errors ("input[2].content[0].type", "tools[0].name", "text.format.schema").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.server.responses_output import item_id
from tokenmill.server.responses_protocol import MESSAGE_ROLES, TEXT_PART_TYPES
from tokenmill.structured.params import StructuredOutputParams

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as a list of items: a string is one user message."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not value:
        raise InvalidRequestError("input", "must be a string or a non-empty list of items")
    return value


def chat_messages(instructions: str | None, items: Sequence[dict[str, Any]],
                  first_index: int = 0) -> list[dict[str, Any]]:
    """Chat messages for the template. Consecutive function calls join one assistant turn (the turn's text, when
    it came just before, included); a function's output is a tool message; a reasoning item's text goes with the
    assistant turn after it (an empty one when no assistant turn follows). `developer` is the system role, as
    most templates know only that one.
    first_index: the position of items[0] in the request's input (items from a previous response come first)."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    pending_reasoning: list[str] = []
    names_by_call: dict[str, str] = {}
    for offset, item in enumerate(items):
        where = f"input[{offset - first_index}]" if offset >= first_index else "previous_response_id"
        if not isinstance(item, dict):
            raise InvalidRequestError(where, "must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "reasoning":
            pending_reasoning.append(_reasoning_text(item, where))
            continue
        if kind == "message":
            message = _message(item, where)
        elif kind == "function_call":
            call = _function_call(item, where)
            names_by_call[call["id"]] = call["function"]["name"]
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not pending_reasoning:  # the same turn
                last.setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
        elif kind == "function_call_output":
            call_id = _text_field(item, "call_id", where, non_empty=True)
            message = {"role": "tool", "tool_call_id": call_id, "content": _text_content(item.get("output"),
                                                                                         f"{where}.output")}
            if call_id in names_by_call:
                message["name"] = names_by_call[call_id]
        else:
            raise InvalidRequestError(f"{where}.type", f"unsupported item type {str(kind)[:40]!r}; this server "
                                      f"reads {', '.join(ITEM_TYPES)} items")
        if pending_reasoning and message["role"] != "assistant":  # reasoning with no answer: an empty one
            messages.append({"role": "assistant", "content": "", "reasoning_content": "".join(pending_reasoning)})
        elif pending_reasoning:
            message["reasoning_content"] = "".join(pending_reasoning)
        pending_reasoning = []
        messages.append(message)
    if pending_reasoning:
        messages.append({"role": "assistant", "content": "", "reasoning_content": "".join(pending_reasoning)})
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise InvalidRequestError(f"{where}.role", f"must be one of {', '.join(MESSAGE_ROLES)}, got {str(role)[:40]!r}")
    content = _text_content(item.get("content"), f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _text_content(content: Any, where: str) -> str:
    """A string, or text parts (input_text / output_text) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(where, "must be a string or a list of text parts")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise InvalidRequestError(f"{where}[{index}]", "must be an object")
        if part.get("type") not in TEXT_PART_TYPES:
            raise InvalidRequestError(f"{where}[{index}].type", f"only text parts ({', '.join(TEXT_PART_TYPES)}) are "
                                      f"supported, got {str(part.get('type'))[:40]!r}")
        texts.append(_text_field(part, "text", f"{where}[{index}]"))
    return "".join(texts)


def _text_field(item: dict[str, Any], name: str, where: str, non_empty: bool = False) -> str:
    value = item.get(name)
    if not isinstance(value, str) or (non_empty and not value):
        raise InvalidRequestError(f"{where}.{name}", "must be a non-empty string" if non_empty else "must be a string")
    return value


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = _text_field(item, "call_id", where, non_empty=True)
    name = _text_field(item, "name", where, non_empty=True)
    arguments = _text_field(item, "arguments", where)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    if item.get("encrypted_content") is not None:
        raise InvalidRequestError(f"{where}.encrypted_content", "this server neither makes nor reads encrypted "
                                  "reasoning; send null")
    texts = []
    for key, part_type in (("summary", "summary_text"), ("content", "reasoning_text")):
        parts = item.get(key)
        if parts is None and key == "content":
            continue
        if not isinstance(parts, list):
            raise InvalidRequestError(f"{where}.{key}", "must be a list of text parts")
        for index, part in enumerate(parts):
            if not isinstance(part, dict) or part.get("type") not in ("summary_text", "reasoning_text"):
                raise InvalidRequestError(f"{where}.{key}[{index}]", f"must be a {part_type} part")
            if key == "content":  # the model's own reasoning; a summary is not what it thought
                texts.append(_text_field(part, "text", f"{where}.{key}[{index}]"))
    return "".join(texts)


_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def stored_input_items(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Already-read input items as GET .../input_items lists them: each with its type, an id and a status, a
    message's content as text parts (input_text, or output_text with its annotations for the assistant's)."""
    stored = []
    for item in items:
        kind = item.get("type", "message")
        entry = {**item, "type": kind}
        entry.setdefault("id", item_id(_ID_PREFIXES[kind]))
        entry.setdefault("status", "completed")
        if kind == "message":
            content = item["content"]
            if isinstance(content, str):
                part = "output_text" if item["role"] == "assistant" else "input_text"
                content = [{"type": part, "text": content}]
            entry["content"] = [{"annotations": [], **p} if p["type"] == "output_text" else p for p in content]
        stored.append(entry)
    return stored


# ---- tools and tool_choice --------------------------------------------------------------------------------

def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Flat function tools ({type, name, description, parameters, strict}) in the chat shape; other tool types
    (web search, file search, ...) are the hosted tools of OpenAI's platform and are refused."""
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"tools[{index}]", "must be an object")
        if tool.get("type") != "function":
            raise InvalidRequestError(f"tools[{index}].type", f"only 'function' tools are supported, got "
                                      f"{str(tool.get('type'))[:40]!r}")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(tool_choice: Any) -> Any:
    """{"type": "function", "name": N} -> the chat shape; the strings pass as they are."""
    if isinstance(tool_choice, dict):
        if tool_choice.get("type") != "function":
            raise InvalidRequestError("tool_choice.type",
                                      f"must be 'function', got {str(tool_choice.get('type'))[:40]!r}")
        return {"type": "function", "function": {"name": tool_choice.get("name")}}
    return tool_choice


def responses_field(field: str) -> str:
    """A chat field name in a tools error, as the Responses request spells it."""
    return field.replace(".function.", ".", 1) if field.startswith(("tools[", "tool_choice.")) else field


# ---- text.format -------------------------------------------------------------------------------------------

def text_format_constraint(text: dict[str, Any] | None) -> StructuredOutputParams | None:
    """`text.format` as the output constraint: json_schema and json_object constrain, text does not."""
    if text is None or text.get("format") is None:
        return None
    spec = text["format"]
    if not isinstance(spec, dict):
        raise InvalidRequestError("text.format", "must be an object with a 'type'")
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        params = StructuredOutputParams(json_object=True, source="text.format")
    elif kind == "json_schema":
        if not isinstance(spec.get("name"), str):
            raise InvalidRequestError("text.format.name", "must be a string")
        if not isinstance(spec.get("schema"), dict):
            raise InvalidRequestError("text.format.schema", "must be a JSON schema object")
        params = StructuredOutputParams(json=spec["schema"], source="text.format.schema")
    else:
        raise InvalidRequestError("text.format.type", f"must be 'text', 'json_object' or 'json_schema', got "
                                  f"{str(kind)[:40]!r}")
    params.validate()
    return params
