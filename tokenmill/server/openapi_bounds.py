"""The OpenAPI document with the model's own bounds: token ids below its vocabulary, top_k up to its size,
the chat_template_kwargs names its template reserves.

The request models are shared by every server, so they only mark the fields whose bound is the model's
(`protocol.VOCAB_BOUND`); the app's document fills the bound in, and says what the engine will accept."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from tokenmill.server.protocol import VOCAB_BOUND


def document_model_bounds(app: FastAPI, vocab_size: int, reserved_template_kwargs: list[str]) -> None:
    """Make app.openapi() state the model's bounds wherever the request models mark them: token ids and top_k
    against the vocabulary, and the chat_template_kwargs names this server refuses."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _fill(build(), vocab_size, sorted(reserved_template_kwargs))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _fill(document: dict[str, Any], vocab_size: int, reserved: list[str]) -> dict[str, Any]:
    stack: list[Any] = [document]
    while stack:  # iterative: the document is the server's own, but a walk need not trust its depth
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.pop(VOCAB_BOUND, None)
            if kind == "token_id":
                node["maximum"] = vocab_size - 1
            elif kind == "top_k":
                node["maximum"] = vocab_size
            elif kind == "template_kwargs":
                node["propertyNames"] = {"not": {"enum": reserved}}
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return document
