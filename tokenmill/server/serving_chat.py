"""POST /v1/chat/completions: render the chat template, generate, split reasoning from the answer."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.engine.async_engine import RequestStream
from tokenmill.engine.chat_template import check_template_kwargs
from tokenmill.engine.prompt_checks import check_prompt_length
from tokenmill.engine.thinking import prompt_opens_thinking
from tokenmill.engine.tokenizer import RenderedChat
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.body_checks import check_request_body
from tokenmill.server.cache_scope import request_cache_salt
from tokenmill.server.errors import stream_error_event
from tokenmill.server.metrics import RequestTracker
from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol import ChatCompletionRequest, check_roles, sampling_params
from tokenmill.server.responses_protocol import ResponsesRequest
from tokenmill.server.reasoning import ReasoningTokenCounter, StreamingReasoningParser
from tokenmill.server.serving_tools import ToolPlan, template_messages
from tokenmill.server.structured_request import structured_outputs
from tokenmill.server.serving_common import (
    SSE_DONE,
    ServerState,
    add_all,
    chat_logprobs,
    merge_streams,
    new_id,
    run_until_done,
    sse,
    usage,
)


class ChatPlan:
    """Per-request decisions shared by the streaming and non-streaming paths."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest | ResponsesRequest, prompt_text: str,
                 tools: ToolPlan) -> None:
        self.state = state
        self.tools = tools
        self.use_parser = state.reasoning_enabled
        self.starts_in_reasoning = prompt_opens_thinking(prompt_text, state.thinking_config)
        # Special-token tags vanish from decoded text; keep special tokens and let the parser drop the others.
        self.keep_specials = self.use_parser and state.tags_are_skipped_specials and body.skip_special_tokens
        self.keep_specials = self.keep_specials or (tools.keeps_special_tokens and body.skip_special_tokens)
        self.num_logprobs = body.num_logprobs()

    def parser(self) -> StreamingReasoningParser:
        drop = self.state.other_specials if self.keep_specials else []
        return StreamingReasoningParser(self.state.thinking_config, self.starts_in_reasoning, drop)

    def split(self, text: str) -> tuple[str | None, str]:
        if not self.use_parser:
            return None, text
        parser = self.parser()
        r1, c1 = parser.feed(text)
        r2, c2 = parser.finish()
        return r1 + r2, c1 + c2

    def reasoning_tokens(self, completion: CompletionOutput) -> int:
        counter = self.reasoning_counter()
        counter.feed(completion.token_ids)
        return counter.count

    def reasoning_counter(self) -> ReasoningTokenCounter:
        thinking = self.state.thinking
        if thinking is None:  # no tokenizer-derived tags: nothing is counted as reasoning
            return ReasoningTokenCounter([], False, None)
        return ReasoningTokenCounter(thinking.end_tag_ids, self.starts_in_reasoning, thinking.start_token_id)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Any:
    check_request_body(body)
    lora_name = state.check_model(body.model)
    body.check_unsupported()
    cache_salt = request_cache_salt(state.prefix_cache_scope, request, body.cache_salt)
    tokenizer = state.tokenizer
    tools = ToolPlan(body.tools, body.tool_choice, body.parallel_tool_calls, tokenizer.chat_template,
                     state.tool_call_parser)
    structured = structured_outputs(body)
    forced = tools.structured_outputs()
    if forced is not None:
        if structured is not None:
            raise InvalidRequestError("tool_choice", "a forced tool call cannot be combined with response_format "
                                      "or guided_* constraints")
        structured = forced
    check_roles(body.messages)
    template_kwargs = body.chat_template_kwargs or {}
    check_template_kwargs(template_kwargs, tokenizer.special_tokens_map, state.trust_request_chat_template)
    chat = await render_prompt(state, [m.model_dump(exclude_none=True) for m in body.messages], tools, "messages",
                               body.add_generation_prompt, template_kwargs)
    plan = ChatPlan(state, body, chat.text, tools)
    params = sampling_params(
        body, max_tokens=body.requested_max_tokens(), prompt_len=len(chat.token_ids),
        max_model_len=state.engine.max_model_len, logprobs=plan.num_logprobs,
        skip_special_tokens=False if plan.keep_specials else None,
        thinking_token_budget=state.thinking_budget(body.thinking_token_budget),
        structured=structured,
    )
    request_id = new_id("chatcmpl")
    prompt = {**chat.prompt(), "cache_salt": cache_salt, "lora_name": lora_name}
    streams = await add_all(state, request_id, [prompt], [params])
    trackers = [state.metrics.tracker()]
    if body.stream:
        return StreamingResponse(_stream(state, body, plan, request_id, streams, trackers),
                                 media_type="text/event-stream")
    finals = await run_until_done(request, streams, trackers)
    return JSONResponse(_response(state, plan, request_id, finals[0]))


async def render_prompt(state: ServerState, messages: list[dict[str, Any]], tools: ToolPlan, field: str,
                        add_generation_prompt: bool = True,
                        template_kwargs: dict[str, Any] | None = None) -> RenderedChat:
    """The chat template over the messages, its length checked (errors name `field`); control tokens written in
    the messages stay text."""
    tokenizer = state.tokenizer
    guard = state.control_tokens
    protected, sentinels = guard.protect(template_messages(messages))
    # Rendering runs a template (code) and tokenizing may take megabytes: both off the event loop.
    chat = guard.restore(await state.engine.run_prepare(functools.partial(
        tokenizer.render_chat, protected, add_generation_prompt=add_generation_prompt, tools=tools.template_tools,
        check_text=lambda text: state.check_prompt_bytes(text, field),
        encode=lambda text: guard.encode(text, sentinels), **(template_kwargs or {}))), sentinels)
    check_prompt_length(len(chat.token_ids), state.engine.max_model_len, field)
    return chat


def _response(state: ServerState, plan: ChatPlan, request_id: str, output: RequestOutput) -> dict[str, Any]:
    choices = []
    completion_tokens = reasoning_tokens = 0
    for completion in output.outputs:
        completion_tokens += len(completion.token_ids)
        reasoning, content = plan.split(completion.text)
        fields, finish_reason = plan.tools.finish_message(content, completion.finish_reason)
        message: dict[str, Any] = {"role": "assistant", **fields}
        if plan.use_parser:
            message["reasoning_content"] = reasoning or None
            reasoning_tokens += plan.reasoning_tokens(completion)
        logprobs = None
        if plan.num_logprobs is not None:
            logprobs = {"content": chat_logprobs(completion.token_ids, completion.logprobs or [], plan.num_logprobs)}
        choices.append({"index": completion.index, "message": message, "logprobs": logprobs,
                        "finish_reason": finish_reason})
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": state.created,
        "model": state.model_name,
        "choices": choices,
        "usage": usage(len(output.prompt_token_ids), completion_tokens, output.num_cached_tokens,
                       reasoning_tokens if plan.use_parser else None),
    }


async def _stream(state: ServerState, body: ChatCompletionRequest, plan: ChatPlan, request_id: str,
                  streams: list[RequestStream], trackers: list[RequestTracker]) -> AsyncIterator[str]:
    # The outputs are deltas: the parsers consume them as they come; usage needs totals, so keep counters.
    parsers = [plan.parser() for _ in range(body.n)]
    tool_streams = [plan.tools.streamer() for _ in range(body.n)]
    reasoning_counters = [plan.reasoning_counter() for _ in range(body.n)]
    prompt_tokens: int | None = None
    completion_tokens = cached_tokens = 0

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> str:
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": state.created,
                    "model": state.model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    try:
        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for _, output in merge_streams(streams):
            trackers[0].observe(output)
            if prompt_tokens is None:
                prompt_tokens = len(output.prompt_token_ids)  # the first output carries the prompt
            cached_tokens = output.num_cached_tokens
            for completion in output.outputs:
                index = completion.index
                delta_text, new_ids = completion.text, completion.token_ids
                completion_tokens += len(new_ids)
                reasoning_counters[index].feed(new_ids)
                if plan.use_parser:
                    reasoning, content = parsers[index].feed(delta_text)
                    if completion.finished:
                        r_rest, c_rest = parsers[index].finish()
                        reasoning, content = reasoning + r_rest, content + c_rest
                else:
                    reasoning, content = "", delta_text
                delta: dict[str, Any] = {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                fragments: list[dict[str, Any]] = [{"content": content}] if content else []
                finish_reason = completion.finish_reason
                tool_stream = tool_streams[index]
                if tool_stream is not None:
                    fragments = tool_stream.feed(content) if content else []
                    if completion.finished:
                        rest, finish_reason = tool_stream.finish(finish_reason)
                        fragments += rest
                logprobs = None
                if plan.num_logprobs is not None and new_ids:
                    logprobs = {"content": chat_logprobs(new_ids, completion.logprobs or [], plan.num_logprobs)}
                # The first fragment shares the chunk with reasoning and logprobs; tool-call fragments
                # each go in their own chunk, as OpenAI streams them.
                if fragments:
                    delta.update(fragments[0])
                last = len(fragments) - 1
                if delta or logprobs or (completion.finished and last <= 0):
                    yield chunk(index, delta, logprobs, finish_reason if last <= 0 else None)
                for position, fragment in enumerate(fragments[1:], start=1):
                    yield chunk(index, fragment, None, finish_reason if position == last else None)
        if body.include_usage and prompt_tokens is not None:
            reasoning_tokens = sum(c.count for c in reasoning_counters) if plan.use_parser else None
            yield sse({"id": request_id, "object": "chat.completion.chunk", "created": state.created,
                       "model": state.model_name, "choices": [],
                       "usage": usage(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens)})
    except Exception as exc:  # after the 200 went out, errors travel as an SSE event
        yield stream_error_event(exc)
    finally:
        for stream in streams:
            stream.abort()
        for tracker in trackers:
            tracker.abandon()
    yield SSE_DONE
