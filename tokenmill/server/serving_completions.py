"""POST /v1/completions: one engine request per prompt, choices indexed prompt_index * n + sample_index."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.engine.async_engine import RequestStream
from tokenmill.engine.prompt_checks import check_prompt_length
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.body_checks import check_request_body
from tokenmill.server.cache_scope import request_cache_salt
from tokenmill.server.errors import stream_error_event
from tokenmill.server.metrics import RequestTracker
from tokenmill.server.structured_request import structured_outputs
from tokenmill.server.protocol import CompletionRequest, sampling_params
from tokenmill.server.serving_common import (
    SSE_DONE,
    ServerState,
    add_all,
    completion_logprobs,
    merge_streams,
    new_id,
    run_until_done,
    sse,
    usage,
)


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Any:
    check_request_body(body)
    lora_name = state.check_model(body.model)
    body.check_unsupported()
    cache_salt = request_cache_salt(state.prefix_cache_scope, request, body.cache_salt)
    engine = state.engine
    prompts: list[dict[str, Any]] = []
    params: list[SamplingParams] = []
    structured = structured_outputs(body)
    for raw in body.prompts():
        if isinstance(raw, str):
            text: str | None = raw
            state.check_prompt_bytes(raw, "prompt")
            ids = await engine.run_prepare(state.tokenizer.encode, raw)
        else:
            text, ids = None, list(raw)
        if not ids:
            raise InvalidRequestError("prompt", "must contain at least one token")
        check_prompt_length(len(ids), engine.max_model_len, "prompt")
        echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        params.append(sampling_params(
            body, max_tokens=body.max_tokens, prompt_len=len(ids), max_model_len=engine.max_model_len,
            logprobs=body.logprobs, prompt_logprobs=echo_logprobs,
            thinking_token_budget=state.thinking_budget(body.thinking_token_budget),
            structured=structured,
        ))
        prompts.append({"prompt": text, "prompt_token_ids": ids, "cache_salt": cache_salt, "lora_name": lora_name})
    request_id = new_id("cmpl")
    streams = await add_all(state, request_id, prompts, params)
    trackers = [state.metrics.tracker() for _ in streams]
    if body.stream:
        return StreamingResponse(_stream(state, body, request_id, streams, trackers), media_type="text/event-stream")
    finals = await run_until_done(request, streams, trackers)
    return JSONResponse(_response(state, body, request_id, finals))


def _echo_text(state: ServerState, output: RequestOutput) -> str:
    if output.prompt is not None:
        return output.prompt
    return state.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False) if state.engine.tokenizer else ""


def _decode_one(state: ServerState) -> Any:
    tokenizer = state.engine.tokenizer
    return (lambda i: tokenizer.decode([i], skip_special_tokens=False)) if tokenizer is not None else None


def _response(state: ServerState, body: CompletionRequest, request_id: str,
              finals: list[RequestOutput]) -> dict[str, Any]:
    choices = []
    prompt_tokens = completion_tokens = cached = 0
    for prompt_index, output in enumerate(finals):
        prompt_tokens += len(output.prompt_token_ids)
        cached += output.num_cached_tokens
        echo = _echo_text(state, output) if body.echo else ""
        for completion in output.outputs:
            completion_tokens += len(completion.token_ids)
            logprobs = None
            if body.logprobs is not None:
                ids, entries = list(completion.token_ids), list(completion.logprobs or [])
                if body.echo:
                    prompt_entries = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids))
                    ids, entries = list(output.prompt_token_ids) + ids, prompt_entries + entries
                logprobs = completion_logprobs(ids, entries, body.logprobs, decode=_decode_one(state))
            choices.append({
                "index": prompt_index * body.n + completion.index,
                "text": echo + completion.text,
                "logprobs": logprobs,
                "finish_reason": completion.finish_reason,
            })
    return {
        "id": request_id,
        "object": "text_completion",
        "created": state.created,
        "model": state.model_name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }


async def _stream(state: ServerState, body: CompletionRequest, request_id: str, streams: list[RequestStream],
                  trackers: list[RequestTracker]) -> AsyncIterator[str]:
    # The outputs are deltas: each chunk is built from what is new; usage needs totals, so keep counters.
    echo: dict[int, str] = {}  # per prompt, from its first output (the one that carries the prompt)
    started: set[int] = set()  # choice indexes whose first chunk went out (it carries the echo)
    prompt_tokens: dict[int, int] = {}
    cached: dict[int, int] = {}
    completion_tokens = 0
    decode = _decode_one(state)

    def chunk(choices: list[dict[str, Any]]) -> str:
        return sse({"id": request_id, "object": "text_completion", "created": state.created,
                    "model": state.model_name, "choices": choices})

    try:
        async for prompt_index, output in merge_streams(streams):
            trackers[prompt_index].observe(output)
            if prompt_index not in prompt_tokens:
                prompt_tokens[prompt_index] = len(output.prompt_token_ids)
                echo[prompt_index] = _echo_text(state, output) if body.echo else ""
            cached[prompt_index] = output.num_cached_tokens
            for completion in output.outputs:
                index = prompt_index * body.n + completion.index
                text = completion.text
                if index not in started:
                    started.add(index)
                    text = echo[prompt_index] + text
                completion_tokens += len(completion.token_ids)
                if not text and not completion.token_ids and not completion.finished:
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(completion.token_ids, completion.logprobs or [], body.logprobs,
                                                   decode=decode)
                yield chunk([{"index": index, "text": text, "logprobs": logprobs,
                              "finish_reason": completion.finish_reason}])
        if body.include_usage:
            total = usage(sum(prompt_tokens.values()), completion_tokens, sum(cached.values()))
            yield sse({"id": request_id, "object": "text_completion", "created": state.created,
                       "model": state.model_name, "choices": [], "usage": total})
    except Exception as exc:  # after the 200 went out, errors travel as an SSE event
        yield stream_error_event(exc)
    finally:
        for stream in streams:
            stream.abort()
        for tracker in trackers:
            tracker.abandon()
    yield SSE_DONE
