"""`tools` / `tool_choice` of a chat request: validation, and the JSON schema that forces a tool call.

For tool_choice "required" or a named function the server constrains generation to
`tool_call_json_schema(...)` with its grammar backend, then turns the JSON the model wrote into tool
calls with `tool_calls_from_forced_json(...)`. The forced shapes are:

- "required": a JSON array (at least one item) of {"name": <a tool's name>, "parameters": <its arguments>},
  each name paired with its own tool's parameter schema;
- {"type": "function", "function": {"name": N}}: just the arguments object of N (the name is known, so
  the model spends no tokens on it; this is also what vLLM forces).

Errors raise `InvalidRequestError` naming the offending field, e.g. "tools[1].function.name".
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.server.tool_parsers.base import IdFactory, ToolCall, new_tool_call_id
from tokenmill.server.tool_parsers.json_scan import strict_loads

# OpenAI's rule for function names.
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CHOICES = ("auto", "none", "required")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def validate_tools(tools: Any) -> None:
    """Check the OpenAI `tools` list: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequestError("tools", "must be a list of {'type': 'function', 'function': {...}} objects")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(where, "must be an object")
        if tool.get("type") != "function":
            raise InvalidRequestError(f"{where}.type", f"must be 'function', got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequestError(f"{where}.function", "must be an object with at least a 'name'")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidRequestError(
                f"{where}.function.name", f"must be 1 to 64 letters, digits, '_' or '-', got {name!r}"
            )
        if name in seen:
            raise InvalidRequestError(f"{where}.function.name", f"{name!r} is already the name of tools[{seen[name]}]")
        seen[name] = i
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(f"{where}.function.description", "must be a string")
        parameters = function.get("parameters")
        if parameters is not None:
            _check_parameters(parameters, f"{where}.function.parameters")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequestError(f"{where}.function.strict", "must be a boolean")


def _check_parameters(parameters: Any, field: str) -> None:
    if not isinstance(parameters, dict):
        raise InvalidRequestError(field, "must be a JSON Schema object")
    kind = parameters.get("type", "object")
    if kind != "object":
        raise InvalidRequestError(field, f"must be a JSON Schema of type 'object', got type {kind!r}")
    try:
        json.dumps(parameters)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(field, f"is not JSON-serializable: {exc}") from None


def validate_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> None:
    """Check `tool_choice` against the (already validated) tools. None means the default ("auto"/"none")."""
    if tool_choice is None:
        return
    names = tool_names(tools)
    if isinstance(tool_choice, str):
        if tool_choice not in _CHOICES:
            raise InvalidRequestError(
                "tool_choice", f"must be one of {', '.join(_CHOICES)} or a named function, got {tool_choice!r}"
            )
        if tool_choice == "required" and not names:
            raise InvalidRequestError("tool_choice", "'required' needs a non-empty 'tools' list")
        return
    if not isinstance(tool_choice, dict):
        raise InvalidRequestError("tool_choice", "must be a string or {'type': 'function', 'function': {'name': ...}}")
    if tool_choice.get("type") != "function":
        raise InvalidRequestError("tool_choice.type", f"must be 'function', got {tool_choice.get('type')!r}")
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidRequestError("tool_choice.function.name", "must be a string")
    if not names:
        raise InvalidRequestError("tool_choice", f"names function {name!r} but the request has no 'tools'")
    if name not in names:
        raise InvalidRequestError(
            "tool_choice.function.name", f"{name!r} is not among the tools ({', '.join(names)})"
        )


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    return [tool["function"]["name"] for tool in tools or []]


def tool_parameters(tools: list[dict[str, Any]] | None, name: str) -> dict[str, Any]:
    """The parameter schema of tool `name`; a tool without one takes no arguments."""
    for tool in tools or []:
        if tool["function"]["name"] == name:
            return tool["function"].get("parameters") or dict(EMPTY_PARAMETERS)
    raise KeyError(name)


def forced_function_name(tool_choice: Any) -> str | None:
    """The function a named tool_choice forces, or None for the string choices."""
    if isinstance(tool_choice, dict):
        return tool_choice["function"]["name"]
    return None


def tool_call_json_schema(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool = True
) -> dict[str, Any] | None:
    """The JSON schema generation must follow, or None when the model is free ("auto", "none", unset).

    With `parallel_tool_calls=False`, "required" allows exactly one call.
    """
    named = forced_function_name(tool_choice)
    if named is not None:
        return tool_parameters(tools, named)
    if tool_choice != "required":
        return None
    definitions: dict[str, Any] = {}
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [name]},
                "parameters": _hoist_references(tool_parameters(tools, name), name, definitions),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name in tool_names(tools)
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return schema


def _has_reference(node: Any) -> bool:
    if isinstance(node, dict):
        return "$ref" in node or any(_has_reference(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_reference(v) for v in node)
    return False


def _hoist_references(parameters: dict[str, Any], tool: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """Re-root the "#..." references of one tool's schema, which nesting it under the array would break.

    The tool's "$defs"/"definitions" move to the combined root as "<tool>.<name>", and a copy of the whole
    parameter schema goes there as "<tool>" for references to its root or its other parts. Schemas without
    references are left inline, as grammar backends handle those best.
    """
    if not _has_reference(parameters):
        return parameters
    local = [key for key in ("$defs", "definitions") if isinstance(parameters.get(key), dict)]

    def target(ref: str) -> str:
        for key in local:
            head = f"#/{key}/"
            if ref.startswith(head):
                return f"#/$defs/{tool}." + ref[len(head) :]
        return f"#/$defs/{tool}" + ref[1:]

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (target(v) if k == "$ref" and isinstance(v, str) and v.startswith("#") else rewrite(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for key in local:
        for name, sub in parameters[key].items():
            definitions[f"{tool}.{name}"] = rewrite(sub)
    body = rewrite({k: v for k, v in parameters.items() if k not in local})
    definitions[tool] = body
    return body


def tool_calls_from_forced_json(
    text: str, tool_choice: Any, tools: list[dict[str, Any]] | None, id_factory: IdFactory | None = None
) -> list[ToolCall]:
    """Turn the output of a generation constrained by `tool_call_json_schema` into tool calls.

    `arguments` is `json.dumps(parameters, ensure_ascii=False)`. Raises ValueError when the text is not
    the forced shape, which in practice means the generation was cut off (finish_reason "length"): the
    caller should then return the text as content.
    """
    new_id = id_factory or new_tool_call_id
    try:
        value = strict_loads(text)
    except ValueError as exc:
        raise ValueError(f"the forced tool call is not complete JSON: {exc}") from None
    named = forced_function_name(tool_choice)
    if named is not None:
        if not isinstance(value, dict):
            raise ValueError("the forced tool call's arguments must be a JSON object")
        return [ToolCall(new_id(), named, json.dumps(value, ensure_ascii=False))]
    if tool_choice != "required":
        raise ValueError(f"tool_choice {tool_choice!r} does not force a tool call")
    if not isinstance(value, list) or not value:
        raise ValueError("the forced tool calls must be a non-empty JSON array")
    names = set(tool_names(tools))
    calls: list[ToolCall] = []
    for item in value:
        if not isinstance(item, dict) or item.get("name") not in names or not isinstance(item.get("parameters"), dict):
            raise ValueError(f"not a call of one of the tools: {json.dumps(item, ensure_ascii=False)[:200]}")
        calls.append(ToolCall(new_id(), item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
    return calls
