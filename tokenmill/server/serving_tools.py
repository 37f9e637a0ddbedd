"""Tool calling in chat completions: which tools the template sees, how the output becomes tool_calls.

Three modes. "off": no tools, or tool_choice "none". "auto": the model may call tools in its own format
(hermes / llama3_json / mistral), parsed from the text, streamed as tool-call deltas. "forced":
tool_choice "required" or a named function: generation is constrained to a JSON schema of the call(s), so
the call always parses, and the JSON becomes tool_calls.
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.server.tool_parsers import (
    ToolCallStreamer,
    ToolParser,
    detect_tool_parser,
    fragments_for_calls,
    get_tool_parser,
)
from tokenmill.server.tool_parsers.schema import (
    forced_function_name,
    tool_call_json_schema,
    tool_calls_from_forced_json,
    validate_tool_choice,
    validate_tools,
)
from tokenmill.structured.params import StructuredOutputParams


class ToolPlan:
    def __init__(self, tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool,
                 chat_template: Any, parser_name: str | None) -> None:
        validate_tools(tools)
        validate_tool_choice(tool_choice, tools)
        self.tools = tools or None
        self.tool_choice = tool_choice
        self.parallel_tool_calls = parallel_tool_calls
        if self.tools is None or tool_choice == "none":
            self.mode = "off"
        elif tool_choice == "required" or forced_function_name(tool_choice) is not None:
            self.mode = "forced"
        else:
            self.mode = "auto"
        self.parser: ToolParser | None = None
        if self.mode == "auto":
            template = chat_template if isinstance(chat_template, str) else json.dumps(chat_template)
            self.parser = get_tool_parser(parser_name or detect_tool_parser(template) or "hermes")

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return None if self.mode == "off" else self.tools

    @property
    def keeps_special_tokens(self) -> bool:
        """Mistral's [TOOL_CALLS] marker is a special token: it must survive decoding to be parsed."""
        return self.parser is not None and type(self.parser).__name__.startswith("Mistral")

    def structured_outputs(self) -> StructuredOutputParams | None:
        if self.mode != "forced":
            return None
        schema = tool_call_json_schema(self.tools, self.tool_choice, self.parallel_tool_calls)
        return StructuredOutputParams(json=schema, source="tools")

    def finish_message(self, content: str | None, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """Message fields (content, tool_calls) and the finish_reason for a whole generated answer."""
        if self.mode == "off" or content is None:
            return {"content": content}, finish_reason
        if self.mode == "forced":
            try:
                calls = tool_calls_from_forced_json(content, self.tool_choice, self.tools)
            except ValueError:  # cut off by max_tokens before the JSON closed
                return {"content": content}, finish_reason
            return {"content": None, "tool_calls": [c.to_openai() for c in calls]}, self._forced_finish(finish_reason)
        assert self.parser is not None
        parsed = self.parser.parse(content)
        if not parsed.tool_calls:
            return {"content": content}, finish_reason
        calls = parsed.tool_calls if self.parallel_tool_calls else parsed.tool_calls[:1]
        reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"content": parsed.content, "tool_calls": [c.to_openai() for c in calls]}, reason

    def _forced_finish(self, finish_reason: str | None) -> str | None:
        # A named function is what the caller asked for, so the turn simply stops; "required" made a choice.
        if finish_reason != "stop":
            return finish_reason
        return "stop" if forced_function_name(self.tool_choice) is not None else "tool_calls"

    def streamer(self) -> "ToolDeltaStream | None":
        return None if self.mode == "off" else ToolDeltaStream(self)


class ToolDeltaStream:
    """Turns one choice's content deltas into OpenAI delta fragments (content or tool_calls)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._streamer: ToolCallStreamer | None = plan.parser.new_streamer() if plan.parser else None
        self._buffer: list[str] = []  # forced mode: the JSON is turned into calls once complete
        self.has_tool_calls = False

    def feed(self, content: str) -> list[dict[str, Any]]:
        if self._streamer is None:
            self._buffer.append(content)
            return []
        fragments = self._streamer.feed(content)
        self.has_tool_calls = self._streamer.has_tool_calls
        return fragments

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        if self._streamer is not None:
            fragments = self._streamer.finish()
            self.has_tool_calls = self._streamer.has_tool_calls
            if self.has_tool_calls and finish_reason == "stop":
                finish_reason = "tool_calls"
            return fragments, finish_reason
        text = "".join(self._buffer)
        try:
            calls = tool_calls_from_forced_json(text, self.plan.tool_choice, self.plan.tools)
        except ValueError:
            return ([{"content": text}] if text else []), finish_reason
        self.has_tool_calls = bool(calls)
        return fragments_for_calls(calls), self.plan._forced_finish(finish_reason)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool_calls carry JSON-string arguments on the wire; templates expect objects."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = dict(message, tool_calls=[_with_object_arguments(c) for c in calls])
            message.setdefault("content", "")  # null on the wire; templates read it as a string
        out.append(message)
    return out


def _with_object_arguments(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise InvalidRequestError("messages", "each tool_calls entry needs a 'function' object")
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return dict(call, function=dict(call["function"], arguments=arguments))
