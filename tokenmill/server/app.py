"""FastAPI app factory for the OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.chat_template import reserved_template_kwargs
from tokenmill.server.auth import APIKeyMiddleware, APIKeys, check_api_keys
from tokenmill.server.cache_scope import DEFAULT_CACHE_SCOPE, check_cache_scope
from tokenmill.server.json_body import OffLoopJSONRoute
from tokenmill.server.errors import error_response, install_error_handlers, send_error
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.lora_routes import adapter_cards, add_lora_routes
from tokenmill.server.openapi_bounds import document_model_bounds
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.responses_protocol import ResponsesRequest
from tokenmill.server.responses_store import DEFAULT_MAX_BYTES, DEFAULT_MAX_STORED, DEFAULT_TTL_S, ResponseStore
from tokenmill.server.reasoning import tokenizer_has_think_tokens
from tokenmill.server.serving_chat import create_chat_completion
from tokenmill.server.serving_common import ServerState, init_reasoning_tokens
from tokenmill.server.serving_completions import create_completion
from tokenmill.server.serving_responses import (
    cancel_response,
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)

DEFAULT_MAX_BODY_BYTES = 4 << 20
# The statuses the API answers with, in its OpenAPI schema (the body of each is server/errors.py's error_body).
_ERROR = {"content": {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}
ACCESS_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "a Host header outside --allowed-hosts", **_ERROR},
    401: {"description": "missing or wrong API key", **_ERROR},
}
GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the result, or with stream=true its server-sent events",
          "content": {"application/json": {}, "text/event-stream": {"schema": {  # each event
              "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}},
    **ACCESS_ERRORS,
    400: {"description": "bad input: the error names the field and the limit", **_ERROR},
    404: {"description": "unknown model", **_ERROR},
    413: {"description": "body larger than --max-body-bytes", **_ERROR},
    503: {"description": "queue full (--max-queue) or shutting down", **_ERROR},
}
STORED_RESPONSE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ACCESS_ERRORS, 404: {"description": "no stored response has this id for this API key", **_ERROR}}
LORA_ERRORS: dict[int | str, dict[str, Any]] = {
    **ACCESS_ERRORS,
    400: {"description": "bad input: an adapter that cannot load here (the error names the field)", **_ERROR},
    404: {"description": "runtime updating is off (--enable-lora-runtime-updating), or no such adapter", **_ERROR},
    413: {"description": "body larger than --max-body-bytes", **_ERROR},
}
REASONING_PARSERS = ("auto", "think", "none")


class BodyLimitMiddleware:
    """Reject bodies over max_bytes with 413 before any parsing (Content-Length or counted while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        # Buffer the body (it is bounded by max_bytes) so a chunked upload is limited as well.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks = []
                break  # disconnected while sending the body
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later reads wait for the disconnect, as streaming responses expect

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        await send_error(send, 413, f"request body is larger than the limit of {self.max_bytes} bytes",
                          "invalid_request_error", "request_too_large")


def build_app(
    async_engine: AsyncLLMEngine,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_thinking_budget: int | None = None,
    reasoning_parser: str = "auto",
    tool_call_parser: str | None = None,
    drain_timeout_s: float = 10.0,
    trust_request_chat_template: bool = False,
    metrics_public: bool = False,
    allowed_hosts: list[str] | None = None,
    api_keys: Sequence[str] = (),
    prefix_cache_scope: str = DEFAULT_CACHE_SCOPE,
    responses_max_stored: int = DEFAULT_MAX_STORED,
    responses_max_bytes: int = DEFAULT_MAX_BYTES,
    responses_ttl_s: float = DEFAULT_TTL_S,
    lora_runtime_updating: bool = False,
) -> FastAPI:
    """The app serving one engine. reasoning_parser: 'think' splits <think>…</think> into reasoning_content,
    'none' never does, 'auto' does when the tokenizer has both tags as tokens. The tags, the wrap-up text
    and their token ids are the engine's (EngineConfig.thinking), so parsing and the budget agree.
    api_key and api_keys: every key accepted (each a tenant of the prefix cache under prefix_cache_scope
    per-key, server/cache_scope.py). responses_*: the bounds of the stored responses (server/responses_store.py).
    lora_runtime_updating: POST /v1/load_lora_adapter and unload_lora_adapter answer (server/lora_routes.py)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: pass a non-empty --api-key or none at all")
    if isinstance(api_keys, str):
        raise ValueError("api_keys must be a list of keys, not one string")
    keys = check_api_keys(([] if api_key is None else [api_key]) + list(api_keys))
    check_cache_scope(prefix_cache_scope)
    stored_responses = ResponseStore(responses_max_stored, responses_max_bytes, responses_ttl_s)
    if reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {reasoning_parser!r}")
    if default_thinking_budget is not None and default_thinking_budget < 0:
        raise ValueError(f"thinking token budget must be >= 0, got {default_thinking_budget}")
    engine = async_engine.engine
    config = engine.config.thinking
    tokenizer = async_engine.tokenizer
    enabled = reasoning_parser == "think" or (
        reasoning_parser == "auto" and tokenizer is not None and tokenizer_has_think_tokens(tokenizer, config))
    state = ServerState(
        engine=async_engine,
        model_name=served_model_name,
        metrics=ServerMetrics(async_engine.stats, served_model_name),
        thinking_config=config,
        thinking=engine.thinking_tokens,  # derived here, before the engine thread starts
        reasoning_enabled=enabled,
        default_thinking_budget=default_thinking_budget,
        tool_call_parser=tool_call_parser,
        trust_request_chat_template=trust_request_chat_template,
        prefix_cache_scope=prefix_cache_scope,
    )
    init_reasoning_tokens(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        # uvicorn has already waited (up to its graceful timeout) for open connections; abort what is left.
        await async_engine.shutdown(drain_timeout_s)

    app = FastAPI(title="tokenmill", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tokenmill = state
    special_names = tokenizer.special_tokens_map if tokenizer is not None else {}
    document_model_bounds(app, engine.arch.vocab_size,
                          reserved_template_kwargs(special_names, trust_request_chat_template))
    install_error_handlers(app)
    # Middleware added last runs first: hosts, then the key, then the body limit, so an unauthenticated
    # body is never read, let alone parsed.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if keys:
        protected = ("/v1",) if metrics_public else ("/v1", "/metrics")
        app.add_middleware(APIKeyMiddleware, keys=APIKeys(keys), protected=protected)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    v1 = APIRouter(prefix="/v1", route_class=OffLoopJSONRoute)

    @v1.post("/completions", responses=GENERATION_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await create_completion(state, body, request)

    @v1.post("/chat/completions", responses=GENERATION_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await create_chat_completion(state, body, request)

    @v1.post("/responses", responses={**GENERATION_ERRORS, 404: {
        "description": "unknown model, or no stored response has the previous_response_id", **_ERROR}})
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        return await create_response(state, stored_responses, body, request)

    @v1.get("/responses/{response_id}", responses=STORED_RESPONSE_ERRORS)
    async def get_response(response_id: str, request: Request) -> Response:
        return retrieve_response(stored_responses, response_id, request)

    @v1.delete("/responses/{response_id}", responses=STORED_RESPONSE_ERRORS)
    async def remove_response(response_id: str, request: Request) -> Response:
        return delete_response(stored_responses, response_id, request)

    @v1.get("/responses/{response_id}/input_items", responses={**STORED_RESPONSE_ERRORS, 400: {
        "description": "bad paging: limit out of range, or an after/before id not among the items", **_ERROR}})
    async def response_input_items(response_id: str, request: Request,
                                   limit: Annotated[int, Query(ge=1, le=100)] = 20,
                                   order: Literal["asc", "desc"] = "desc", after: str | None = None,
                                   before: str | None = None) -> Response:
        return list_input_items(stored_responses, response_id, request, limit, order, after, before)

    # Starlette's 405 names only the first route's method: this one answers the other methods with both.
    @v1.api_route("/responses/{response_id}", methods=["POST", "PUT", "PATCH", "OPTIONS", "HEAD", "TRACE"],
                  include_in_schema=False)
    async def response_methods(response_id: str) -> Response:
        return error_response(405, "Method Not Allowed", headers={"Allow": "GET, DELETE"})

    @v1.post("/responses/{response_id}/cancel", responses={**STORED_RESPONSE_ERRORS, 400: {
        "description": "the response was not created with background=true", **_ERROR}})
    async def cancel(response_id: str, request: Request) -> Response:
        return await cancel_response(stored_responses, response_id, request)

    @v1.get("/models", responses=ACCESS_ERRORS)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": state.created, "owned_by": "tokenmill",
            "max_model_len": async_engine.max_model_len,
        }, *adapter_cards(state)]}

    add_lora_routes(v1, state, lora_runtime_updating, LORA_ERRORS)

    app.include_router(v1)

    @app.get("/health", responses={503: {"description": "the engine is not running"}})
    async def health() -> Response:
        if not async_engine.is_running:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse, responses=ACCESS_ERRORS)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app
