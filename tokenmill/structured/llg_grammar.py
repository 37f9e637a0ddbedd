"""The bridge to llguidance: import it on demand, and turn StructuredOutputParams into its grammar text.

llguidance is an optional dependency, imported only when the first structured request arrives, so
`import tokenmill` needs nothing beyond the engine's own dependencies.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.structured.params import StructuredOutputParams

INSTALL_HINT = "pip install llguidance (or pip install 'tokenmill[structured]')"

# JSON is written on one line with json.dumps' default separators and no other whitespace: a model
# that is unsure what comes next cannot stall by emitting spaces and newlines forever. A schema may
# loosen this through llguidance's "x-guidance" key, which is applied on top of these defaults.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def import_llguidance(field: str) -> ModuleType:
    """The llguidance module, or an InvalidRequestError naming the package when it is not installed."""
    try:
        import llguidance
    except ImportError as e:
        raise InvalidRequestError(
            field, f"structured output needs the 'llguidance' package, which is not installed: {INSTALL_HINT} "
            f"({e})") from None
    return llguidance


def grammar_text(llg: ModuleType, params: StructuredOutputParams) -> str:
    """llguidance's grammar definition (a JSON string) for the request's one option."""
    kind, field = params.kind, params.error_field
    try:
        if kind in ("json", "json_object"):
            return llg.LLMatcher.grammar_from_json_schema(params.schema(), defaults=JSON_OPTIONS)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return llg.LLMatcher.grammar_from_lark(_choice_lark(params.choice or ()))
        # Lark passes through; anything else is read as GBNF and converted to Lark.
        return llg.grammar_from("grammar", params.grammar)
    except (ValueError, TypeError) as e:  # bad schema arguments, or GBNF that does not convert
        raise InvalidRequestError(field, f"invalid {_WHAT[kind]}: {e}") from None


def _choice_lark(choices: Any) -> str:
    # Lark string literals take JSON's escapes, so json.dumps quotes each choice exactly; keeping
    # non-ASCII characters as they are avoids relying on \\u escapes for astral characters.
    return "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def compile_template(llg: ModuleType, tokenizer: Any, params: StructuredOutputParams, limits: Any) -> Any:
    """A fresh llguidance matcher for the request's grammar, never advanced: matchers are copies of it.

    llguidance reports grammar errors through the matcher's error state, not exceptions; they become
    InvalidRequestErrors that quote its message.
    """
    text = grammar_text(llg, params)
    template = llg.LLMatcher(tokenizer, text, log_level=0, limits=limits)
    if template.is_error():
        raise InvalidRequestError(params.error_field, f"invalid {_WHAT[params.kind]}: {template.get_error()}")
    return template


_WHAT = {
    "json": "JSON schema",
    "json_object": "JSON schema",
    "regex": "regular expression",
    "choice": "choice list",
    "grammar": "grammar",
}
