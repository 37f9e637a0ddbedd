"""What completions and chat share: server state, request lifecycle, SSE, logprobs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tokenmill.config import ThinkingConfig
from tokenmill.engine.async_engine import AsyncLLMEngine, RequestStream
from tokenmill.engine.control_tokens import ControlTokenGuard
from tokenmill.engine.prompt_checks import check_prompt_bytes, longest_token_bytes
from tokenmill.engine.thinking import ThinkingTokens
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.outputs import LogprobsDict, RequestOutput
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import RequestTracker, ServerMetrics

DISCONNECT_POLL_S = 0.25
MERGE_QUEUE_SIZE = 8


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_name: str
    metrics: ServerMetrics
    # The engine's thinking tags (EngineConfig.thinking) and their ids in its tokenizer (None without one).
    thinking_config: ThinkingConfig
    thinking: ThinkingTokens | None
    reasoning_enabled: bool = False  # split <think> into reasoning_content in chat responses
    default_thinking_budget: int | None = None
    tool_call_parser: str | None = None  # None: guessed from the chat template
    trust_request_chat_template: bool = False  # chat_template in chat_template_kwargs is refused unless set
    prefix_cache_scope: str = "per-key"  # whose requests share prefix-cache hits (server/cache_scope.py)
    max_token_bytes: int = 1  # the vocabulary's longest token in bytes: bounds a prompt's bytes before tokenizing
    guard: ControlTokenGuard | None = None  # set with the tokenizer: keeps control tokens in messages as text
    # Derived from the tokenizer once, at startup.
    tags_are_skipped_specials: bool = False  # the tags vanish from text unless special tokens are kept
    other_specials: list[str] = field(default_factory=list)  # then removed by the parser instead
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Tokenizer:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer; send prompts as token ids", param="prompt")
        return tokenizer

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter the request's model names (None: the base model); an unknown model is a 404."""
        if model is None or model == self.model_name:
            return None
        adapters = self.engine.engine.lora.names()
        if model in adapters:
            return model
        served = ", ".join(repr(name) for name in [self.model_name, *adapters])
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served}",
                       type_="not_found_error", param="model", code="model_not_found")

    @property
    def control_tokens(self) -> ControlTokenGuard:
        if self.guard is None:
            raise APIError(400, "this checkpoint has no tokenizer; send prompts as token ids", param="messages")
        return self.guard

    def check_prompt_bytes(self, text: str, field: str) -> None:
        check_prompt_bytes(text, self.engine.max_model_len, self.max_token_bytes, field)

    def thinking_budget(self, budget: int | None) -> int | None:
        """The request's thinking budget, else the server's default; the engine derives the tag ids."""
        return self.default_thinking_budget if budget is None else budget


def init_reasoning_tokens(state: ServerState) -> None:
    """Precompute which special-token strings the parser must drop when the tags are special tokens."""
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        return
    state.max_token_bytes = longest_token_bytes(tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size)))
    state.guard = ControlTokenGuard(tokenizer, exempt=(state.thinking_config.start, state.thinking_config.end))
    tags = state.thinking_config
    tag_ids = [tokenizer.token_to_id(tags.start), tokenizer.token_to_id(tags.end)]
    state.tags_are_skipped_specials = any(i is not None and tokenizer.is_skipped_special(i) for i in tag_ids)
    if state.tags_are_skipped_specials:
        specials = [i for i in range(tokenizer.vocab_size) if tokenizer.is_skipped_special(i) and i not in tag_ids]
        state.other_specials = [tokenizer.decode([i], skip_special_tokens=False) for i in specials]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they arrive, as (prompt index, output)."""
    # Bounded: when the consumer (the HTTP response, blocked on a client that stopped reading) does not take,
    # the pumps stop reading their streams and the engine's unread-output limit applies.
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue(MERGE_QUEUE_SIZE)

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(exc)
            return
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def run_until_done(request: Request, streams: list[RequestStream],
                         trackers: list[RequestTracker]) -> list[RequestOutput]:
    """Collect every stream's final output; a client that disconnects meanwhile aborts them all."""

    async def collect() -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for index, output in merge_streams(streams):
            trackers[index].observe(output)
            if output.finished:
                finals[index] = output
        return [f for f in finals if f is not None]

    task = asyncio.create_task(collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        return await task
    finally:
        if not task.done():
            task.cancel()
        for stream in streams:
            stream.abort()
        for tracker in trackers:
            tracker.abandon()


async def add_all(state: ServerState, base_id: str, prompts: list[dict[str, Any]],
                  params: list[Any]) -> list[RequestStream]:
    """Add one engine request per prompt; if any is refused, abort the ones already added."""
    streams: list[RequestStream] = []
    try:
        for index, (prompt, sampling) in enumerate(zip(prompts, params)):
            streams.append(await state.engine.add_request(f"{base_id}-{index}", prompt, sampling))
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    return streams


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return body


# ---- logprobs ------------------------------------------------------------------------------------------

def _token_text(entry: LogprobsDict, token_id: int) -> str:
    lp = entry.get(token_id)
    return (lp.decoded_token if lp is not None and lp.decoded_token is not None else "") or ""


def _top(entry: LogprobsDict, num: int) -> list[tuple[int, Any]]:
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
    return [(tid, lp) for tid, lp in ranked if lp.rank <= num][:num]


def chat_logprobs(token_ids: list[int], entries: list[LogprobsDict], num: int) -> list[dict[str, Any]]:
    """OpenAI chat shape: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id)
        text = _token_text(entry, token_id)
        content.append({
            "token": text,
            "logprob": max(chosen.logprob, -9999.0) if chosen is not None else -9999.0,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": lp.decoded_token or "", "logprob": max(lp.logprob, -9999.0),
                 "bytes": list((lp.decoded_token or "").encode("utf-8"))}
                for _, lp in _top(entry, num)
            ],
        })
    return content


def completion_logprobs(token_ids: list[int], entries: list[LogprobsDict | None], num: int,
                        text_offset: int = 0, decode: Callable[[int], str] | None = None) -> dict[str, Any]:
    """OpenAI completions shape: {tokens, token_logprobs, top_logprobs, text_offset}; a None entry (the first
    prompt token of an echo has no logprob) keeps a None logprob and its text comes from `decode`."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    top: dict[str, float] | None
    offsets: list[int] = []
    offset = text_offset
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            text, value, top = (decode(token_id) if decode else ""), None, None
        else:
            chosen = entry.get(token_id)
            text = _token_text(entry, token_id)
            value = max(chosen.logprob, -9999.0) if chosen is not None else None
            top = {}
            for _, lp in _top(entry, num):  # tokens that decode alike (e.g. partial UTF-8): keep the likeliest
                top.setdefault(lp.decoded_token or "", max(lp.logprob, -9999.0))
        tokens.append(text)
        token_logprobs.append(value)
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
