"""Chat-template rendering helpers: the jinja2 sandbox, the helpers templates call, message checking.

The sandbox renders a checkpoint's template the way transformers does, but only ever sees plain JSON
values, cannot write attributes of objects it did not create, and turns `raise_exception` into a request
error.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import InvalidRequestError

# Names a message's reasoning may arrive under; templates read `reasoning_content` (or `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant spans in some templates; we render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Like transformers: refuse underscore attributes so templates cannot reach CPython internals.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


class TemplateRaised(Exception):
    """Raised by the template's raise_exception(); carries the template author's message."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: no HTML escaping (jinja's builtin escapes <, >, &), and exposes indent etc.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def make_template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = dict
    return env


def _is_content(node: jinja2.nodes.Node, aliases: set[str]) -> bool:
    if isinstance(node, jinja2.nodes.Filter) and node.node is not None:  # `message['content'] | select...`
        return _is_content(node.node, aliases)
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, jinja2.nodes.Name) and node.name in aliases


def iterates_content(env: ImmutableSandboxedEnvironment, source: str) -> bool:
    """True when the template loops over a message's content, i.e. it understands lists of content parts."""
    ast = env.parse(source)
    aliases: set[str] = set()  # `{% set content = message['content'] %}{% for part in content %}`
    for assign in ast.find_all(jinja2.nodes.Assign):
        if isinstance(assign.target, jinja2.nodes.Name) and _is_content(assign.node, aliases):
            aliases.add(assign.target.name)
    return any(_is_content(loop.iter, aliases) for loop in ast.find_all(jinja2.nodes.For))


def plain_json(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types so the sandbox never sees rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, str):  # subclasses (str enums, ...) are stripped back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models from the server
        return plain_json(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping[str, Any]], keep_parts: bool) -> list[dict[str, Any]]:
    """Validate messages; drop None values; flatten text content parts unless the template iterates them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content} objects")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(messages):
        msg = plain_json(raw)
        if not isinstance(msg, dict):
            raise InvalidRequestError(f"messages[{i}]", "must be an object with 'role' and 'content'")
        if not isinstance(msg.get("role"), str):
            raise InvalidRequestError(f"messages[{i}].role", "must be a string")
        # OpenAI clients send content=None / tool_calls=None; templates handle missing keys better.
        msg = {k: v for k, v in msg.items() if v is not None}
        content = msg.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"messages[{i}].content[{j}]",
                                              "only {\"type\": \"text\", \"text\": ...} content parts are supported")
            if not keep_parts:
                msg["content"] = "\n".join(part["text"] for part in content)
        elif content is not None and not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content", "must be a string or a list of content parts")
        reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out
