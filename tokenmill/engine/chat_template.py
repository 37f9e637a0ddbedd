"""Chat-template rendering helpers: the jinja2 sandbox, the helpers templates call, message checking.

The sandbox renders a checkpoint's template the way transformers does, but only ever sees plain JSON
values, cannot write attributes of objects it did not create, and turns `raise_exception` into a request
error.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import InvalidRequestError
from tokenmill.input_checks import check_json_value

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


# Every render (the checkpoint's template too) is bounded in time and output: a template is code, and a
# request's messages drive its loops. Real templates render in milliseconds to a few hundred KB.
RENDER_TIME_BUDGET_S = 2.0
MAX_RENDERED_CHARS = 1 << 24
# Variables the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "chat_template",
                                         "raise_exception", "strftime_now", "namespace", "dict"})


class TemplateBudgetExceeded(Exception):
    """A render ran past its time or output budget; carries which budget and its limit."""


class _RenderBudget(threading.local):
    deadline: float | None = None
    max_chars: int = MAX_RENDERED_CHARS

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(f"rendering took longer than the budget of {RENDER_TIME_BUDGET_S:g} s")


_budget = _RenderBudget()


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with a clock: every call, attribute and item lookup checks the render's deadline (a loop
    body that does none of these is itself bounded by the sandbox's range() limit), and `*` / `**` cannot
    build values past the output budget."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's names
        _budget.check()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget.check()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget.check()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _budget.check()
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise jinja2.exceptions.SecurityError(f"exponent {right} is too large for a chat template")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > _budget.max_chars:
                    raise TemplateBudgetExceeded(f"a repeated value would exceed the output budget of "
                                                 f"{_budget.max_chars} characters")
        return super().call_binop(context, operator, left, right)


def render_bounded(template: jinja2.Template, variables: Mapping[str, Any]) -> str:
    """Render within RENDER_TIME_BUDGET_S and MAX_RENDERED_CHARS; TemplateBudgetExceeded past either."""
    _budget.deadline = time.monotonic() + RENDER_TIME_BUDGET_S
    try:
        parts: list[str] = []
        size = 0
        for part in template.generate(**variables):
            size += len(part)
            if size > _budget.max_chars:
                raise TemplateBudgetExceeded(f"the rendered prompt exceeds the output budget of {_budget.max_chars} "
                                             "characters")
            parts.append(part)
            _budget.check()
        return "".join(parts)
    finally:
        _budget.deadline = None


def reserved_template_kwargs(special_names: Iterable[str], allow_template: bool) -> list[str]:
    """The chat_template_kwargs names check_template_kwargs refuses."""
    reserved = set(RESERVED_TEMPLATE_VARIABLES) | set(special_names)
    return sorted(reserved - {"chat_template"} if allow_template else reserved)


def check_template_kwargs(kwargs: Mapping[str, Any], special_names: Iterable[str], allow_template: bool) -> None:
    """chat_template_kwargs from a client: extra variables only, never the renderer's own inputs."""
    for key in kwargs:
        if key == "chat_template" and not allow_template:
            raise InvalidRequestError("chat_template_kwargs.chat_template", "templates from requests are refused by "
                                      "this server (the operator can allow them with --trust-request-chat-template)")
        if key != "chat_template" and (key in RESERVED_TEMPLATE_VARIABLES or key in set(special_names)):
            raise InvalidRequestError(f"chat_template_kwargs.{key}", "is set by the server and may not be overridden; "
                                      f"reserved: {', '.join(sorted(RESERVED_TEMPLATE_VARIABLES))} and the "
                                      "tokenizer's special tokens")


def make_template_env() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(
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
        check_json_value(msg, f"messages[{i}]")  # text the tokenizer could not encode, nesting
        # OpenAI clients send content=None / tool_calls=None; templates handle missing keys better.
        msg = {k: v for k, v in msg.items() if v is not None}
        if "content" not in msg and "tool_calls" not in msg:
            msg["content"] = ""  # a message without content says nothing: templates read message['content']
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
