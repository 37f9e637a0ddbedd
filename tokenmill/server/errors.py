"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the right HTTP status.

Bad input is always a 4xx naming the field; only a bug in tokenmill itself becomes a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from tokenmill.engine.async_engine import EngineOverloadedError
from tokenmill.errors import InvalidRequestError, RequestFailedError
from tokenmill.input_checks import MAX_JSON_DEPTH

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


async def send_error(send: Send, status: int, message: str, type_: str, code: str) -> None:
    """The error body sent by an ASGI middleware, before any route (and its exception handlers) runs."""
    payload = json.dumps(error_body(message, type_, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def to_api_error(exc: BaseException) -> APIError:
    """Map an exception raised while serving a request to the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.field)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), type_="server_overloaded", code="server_overloaded")
    if isinstance(exc, RequestFailedError):
        if exc.field is not None:  # the request's own input made it fail (e.g. its grammar): the client's error
            return APIError(400, str(exc), param=exc.field)
        return APIError(500, str(exc), type_="server_error")
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", type_="server_error")


def stream_error_event(exc: BaseException) -> str:
    """An error that happens after an SSE stream started is sent as one more event."""
    err = to_api_error(exc)
    return f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    # loc looks like ("body", "temperature") or ("body", "messages", 0, "content"); drop the "body" and
    # pydantic's union-branch names (e.g. "str", "list[str]") so the param is the field the client sent.
    parts = [p for p in loc[1:] if isinstance(p, int) or (isinstance(p, str) and "[" not in p and p not in
                                                          ("str", "int", "float", "bool", "function-after"))]
    if not parts:
        return None
    text = str(parts[0])
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx") or {}
            detail = ctx.get("error", "")
            return error_response(400, f"malformed JSON body: {detail}".rstrip(": "), code="invalid_json")
        loc = tuple(first.get("loc", ()))
        if loc == ("body",):
            return error_response(400, "the request body must be a JSON object", code="invalid_json")
        param = _validation_param(loc)
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        if first.get("type") == "missing":
            message = f"{param}: this field is required"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's json.loads gave up on the nesting
            return error_response(400, f"malformed JSON body: nested deeper than the parser allows (the limit "
                                  f"is {MAX_JSON_DEPTH} levels)", code="invalid_json")
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # Keep Starlette's headers: a 405 must list the allowed methods in Allow (RFC 9110).
        return error_response(exc.status_code, str(exc.detail), type_=type_, headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(exc), param=exc.field)

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(request: Request, exc: EngineOverloadedError) -> JSONResponse:
        return error_response(503, str(exc), type_="server_overloaded", code="server_overloaded",
                              headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.type, err.param, err.code)
