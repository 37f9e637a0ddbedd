"""POST /v1/responses, and GET / DELETE / cancel of a stored response: OpenAI's Responses API on the chat path.

The input items (after the stored conversation that previous_response_id names) become chat messages
(responses_input.py) and go through the chat path's owners: the template rendering off the loop, the tool plan
(parsing or forcing calls), the output constraint, the reasoning parser and token counter, sampling_params.
The output is built as items (responses_output.py); a streamed response sends each item's events as OpenAI
names them, each with a sequence number and its type as the SSE `event:` line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.server.auth import KEY_ID_STATE
from tokenmill.server.body_checks import check_request_body
from tokenmill.server.cache_scope import request_cache_salt
from tokenmill.server.errors import APIError, to_api_error
from tokenmill.server.metrics import RequestTracker
from tokenmill.server.protocol import sampling_params
from tokenmill.server.responses_input import (
    chat_messages,
    chat_tool_choice,
    chat_tools,
    input_items,
    responses_field,
    stored_input_items,
    text_format_constraint,
)
from tokenmill.server.responses_output import Event, OutputItems, item_id
from tokenmill.server.responses_protocol import ResponsesRequest
from tokenmill.server.responses_store import ResponseStore
from tokenmill.server.serving_chat import ChatPlan, render_prompt
from tokenmill.server.serving_common import ServerState, add_all, merge_streams, run_until_done
from tokenmill.server.serving_tools import ToolPlan
from tokenmill.server.structured_request import structured_outputs
from tokenmill.structured.params import StructuredOutputParams

# The engine's finish reasons as a response's status; any other (an abort at shutdown) fails the response.
_STATUS = {"stop": "completed", "length": "incomplete"}


def request_owner(request: Request) -> str | None:
    """The id of the API key that sent the request (None when the server has no keys)."""
    return getattr(request.state, KEY_ID_STATE, None)


class ResponseTurn:
    """One response being generated: its output items as the engine's outputs arrive, its usage, its body."""

    def __init__(self, state: ServerState, body: ResponsesRequest, plan: ChatPlan, response_id: str) -> None:
        self.state = state
        self.body = body
        self.plan = plan
        self.id = response_id
        self.created_at = int(time.time())
        self.output = OutputItems()
        self._parser = plan.parser() if plan.use_parser else None
        self._tool_stream = plan.tools.streamer()
        self._reasoning = plan.reasoning_counter()
        self.prompt_tokens: int | None = None
        self.output_tokens = self.cached_tokens = 0
        self.finish_reason: str | None = None

    def feed(self, output: RequestOutput) -> list[Event]:
        """The events one engine output makes (its text is a delta when streaming, the whole text otherwise)."""
        if self.prompt_tokens is None:
            self.prompt_tokens = len(output.prompt_token_ids)  # the first output carries the prompt
        self.cached_tokens = output.num_cached_tokens
        completion = output.outputs[0]
        self.output_tokens += len(completion.token_ids)
        self._reasoning.feed(completion.token_ids)
        reasoning, content = "", completion.text
        if self._parser is not None:
            reasoning, content = self._parser.feed(completion.text)
            if completion.finished:
                reasoning_rest, content_rest = self._parser.finish()
                reasoning, content = reasoning + reasoning_rest, content + content_rest
        events = self.output.reasoning(reasoning)
        fragments: list[dict[str, Any]] = [{"content": content}] if content else []
        if self._tool_stream is not None:
            fragments = self._tool_stream.feed(content) if content else []
            if completion.finished:
                fragments += self._tool_stream.finish(completion.finish_reason)[0]
        events += self.output.content(fragments)
        if completion.finished:
            self.finish_reason = completion.finish_reason or "stop"
            events += self.output.finish(incomplete=self.finish_reason == "length")
        return events

    def response(self, status: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object: in progress until the output finished, then completed, incomplete or failed."""
        if status is None:
            status = "in_progress" if self.finish_reason is None else _STATUS.get(self.finish_reason, "failed")
        if status == "failed" and error is None:
            error = {"code": "server_error", "message": "the request was aborted before it finished (the server is "
                     "shutting down)"}
        body = self.body
        text_format = (body.text or {}).get("format") or {"type": "text"}
        usage = None
        if self.prompt_tokens is not None:
            reasoning_tokens = self._reasoning.count if self.plan.use_parser else 0
            # cache_write_tokens counts OpenAI's explicit prompt caching, which this server does not have.
            cache = {"cached_tokens": self.cached_tokens, "cache_write_tokens": 0}
            usage = {"input_tokens": self.prompt_tokens, "input_tokens_details": cache,
                     "output_tokens": self.output_tokens,
                     "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                     "total_tokens": self.prompt_tokens + self.output_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": body.background, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "model": self.state.model_name,
            "output": [dict(item) for item in self.output.items] if status != "in_progress" else [],
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": body.store,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": text_format}, "tool_choice": "auto" if body.tool_choice is None else body.tool_choice,
            "tools": body.tools or [], "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled",
            "usage": usage, "user": body.user,
        }


async def create_response(state: ServerState, store: ResponseStore, body: ResponsesRequest, request: Request) -> Any:
    check_request_body(body)
    lora_name = state.check_model(body.model)  # the adapter the model field names, None: the base model
    body.check_unsupported()
    owner = request_owner(request)
    history = None
    if body.previous_response_id is not None:
        history = store.get(body.previous_response_id, owner, param="previous_response_id")
        if history.body["status"] == "in_progress":  # a background response: its output is not there yet
            raise InvalidRequestError("previous_response_id", "that response is still being generated; poll it "
                                      "with GET /v1/responses/{id} until it finishes")
    new_items = input_items(body.input)
    earlier = history.conversation if history is not None else []
    messages = chat_messages(body.instructions, earlier + new_items, first_index=len(earlier))
    new_items = stored_input_items(new_items)  # read: now with ids, as input_items lists them
    cache_salt = request_cache_salt(state.prefix_cache_scope, request, body.cache_salt)
    tokenizer = state.tokenizer
    try:  # the chat path's checks, their fields named as this request spells them
        tools = ToolPlan(chat_tools(body.tools), chat_tool_choice(body.tool_choice), body.parallel_tool_calls,
                         tokenizer.chat_template, state.tool_call_parser)
    except InvalidRequestError as exc:
        raise InvalidRequestError(responses_field(exc.field), exc.message) from None
    structured = _output_constraint(body)
    forced = tools.structured_outputs()
    if forced is not None and structured is not None:
        raise InvalidRequestError("tool_choice", "a forced tool call cannot be combined with a json_object or "
                                  "json_schema text.format")
    chat = await render_prompt(state, messages, tools, "input")
    plan = ChatPlan(state, body, chat.text, tools)
    params = sampling_params(
        body, max_tokens=body.max_output_tokens, prompt_len=len(chat.token_ids),
        max_model_len=state.engine.max_model_len, logprobs=None,
        skip_special_tokens=False if plan.keep_specials else None,
        thinking_token_budget=state.thinking_budget(body.thinking_token_budget),
        structured=forced or structured,
    )
    if body.background:  # outputs as they come, so a cancelled response keeps what was generated
        params = dataclasses.replace(params, output_kind="delta")
    turn = ResponseTurn(state, body, plan, item_id("resp"))
    prompt = {**chat.prompt(), "cache_salt": cache_salt, "lora_name": lora_name}
    streams = await add_all(state, turn.id, [prompt], [params])
    trackers = [state.metrics.tracker()]

    def keep(response: dict[str, Any]) -> None:
        if body.store:
            store.put(turn.id, owner, response, history, new_items + [dict(item) for item in turn.output.items])

    if body.stream:
        return StreamingResponse(_events(turn, streams, trackers, keep), media_type="text/event-stream")
    if body.background:  # stored at once, so GET sees it in progress; the task stores the result over it
        if not store.put(turn.id, owner, turn.response("in_progress"), history, new_items):
            for stream in streams:
                stream.abort()
            raise InvalidRequestError("background", "the response would not fit the stored responses' bounds "
                                      "(--responses-max-stored, --responses-max-bytes); send it without background")
        store.running[turn.id] = asyncio.create_task(_generate_in_background(turn, streams, trackers, keep, store))
        return JSONResponse(turn.response("in_progress"))
    finals = await run_until_done(request, streams, trackers)
    turn.feed(finals[0])
    response = turn.response()
    keep(response)
    return JSONResponse(response)


def _output_constraint(body: ResponsesRequest) -> StructuredOutputParams | None:
    """text.format, or one of the guided_* extensions (the chat route's, read by their owner); not both."""
    text_format, guided = text_format_constraint(body.text), structured_outputs(body)
    if text_format is not None and guided is not None:
        raise InvalidRequestError("text.format", "only one output constraint per request: a json_object or "
                                  "json_schema text.format, or a guided_* extension")
    return text_format or guided


def _sse(event: Event, sequence_number: int) -> str:
    payload = {**event, "sequence_number": sequence_number}
    return f"event: {event['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(turn: ResponseTurn, streams: list[Any], trackers: list[RequestTracker],
                  keep: Callable[[dict[str, Any]], None]) -> AsyncIterator[str]:
    sequence_number = 0

    def send(event: Event) -> str:
        nonlocal sequence_number
        sequence_number += 1
        return _sse(event, sequence_number - 1)

    try:
        yield send({"type": "response.created", "response": turn.response("in_progress")})
        yield send({"type": "response.in_progress", "response": turn.response("in_progress")})
        async for _, output in merge_streams(streams):
            trackers[0].observe(output)
            for event in turn.feed(output):
                yield send(event)
        final = turn.response()
        keep(final)
        yield send({"type": f"response.{final['status']}", "response": final})
    except Exception as exc:  # noqa: BLE001 - after the 200 went out, an error is an event, then response.failed
        err = to_api_error(exc)
        yield send({"type": "error", "code": err.code or err.type, "message": err.message, "param": err.param})
        code = "server_error" if err.status >= 500 else "invalid_prompt"
        yield send({"type": "response.failed", "response": turn.response("failed", {"code": code,
                                                                                    "message": err.message})})
    finally:
        for stream in streams:
            stream.abort()
        for tracker in trackers:
            tracker.abandon()


async def _generate_in_background(turn: ResponseTurn, streams: list[Any], trackers: list[RequestTracker],
                                  keep: Callable[[dict[str, Any]], None], store: ResponseStore) -> None:
    try:
        async for _, output in merge_streams(streams):
            trackers[0].observe(output)
            turn.feed(output)
        final = turn.response()
    except asyncio.CancelledError:  # POST .../cancel (or DELETE): what was generated so far, cut off
        if turn.finish_reason is None:
            turn.output.finish(incomplete=True)
        final = turn.response("cancelled")
    except Exception as exc:  # noqa: BLE001 - the response fails, and GET shows why
        err = to_api_error(exc)
        final = turn.response("failed", {"code": "server_error" if err.status >= 500 else "invalid_prompt",
                                         "message": err.message})
    finally:
        store.running.pop(turn.id, None)
        for stream in streams:
            stream.abort()
        for tracker in trackers:
            tracker.abandon()
    if store.holds(turn.id):  # not deleted (or evicted) meanwhile
        keep(final)


def retrieve_response(store: ResponseStore, response_id: str, request: Request) -> JSONResponse:
    return JSONResponse(store.get(response_id, request_owner(request)).body)


def list_input_items(store: ResponseStore, response_id: str, request: Request, limit: int, order: str,
                     after: str | None, before: str | None) -> JSONResponse:
    """The items the response's input was made of (the earlier turns' included), a page at a time as OpenAI
    pages them: `after` / `before` an item id, in `order`."""
    entry = store.get(response_id, request_owner(request))
    items = entry.conversation[:len(entry.conversation) - len(entry.body["output"])]
    if order == "desc":
        items = items[::-1]
    ids = [item["id"] for item in items]
    for name, cursor in (("after", after), ("before", before)):
        if cursor is not None and cursor not in ids:
            raise InvalidRequestError(name, f"no input item of this response has the id {cursor[:100]!r}")
    start = ids.index(after) + 1 if after is not None else 0
    end = ids.index(before) if before is not None else len(items)
    page = items[start:end][:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < end})


def delete_response(store: ResponseStore, response_id: str, request: Request) -> JSONResponse:
    store.delete(response_id, request_owner(request))
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(store: ResponseStore, response_id: str, request: Request) -> JSONResponse:
    """Stop a background response and answer with it as stored (status cancelled); one that already finished
    is answered as it is. Any other response finished within its own request: a 400."""
    owner = request_owner(request)
    entry = store.get(response_id, owner)
    task = store.running.get(response_id)
    if task is not None:
        task.cancel()
        await asyncio.wait({task})
        return JSONResponse(store.get(response_id, owner).body)
    if not entry.body.get("background"):
        raise APIError(400, f"the response {response_id[:100]!r} was not created with background=true: only "
                       "background responses can be cancelled", param="response_id", code="not_background")
    return JSONResponse(entry.body)
