"""Driving a live server with the official `openai` client: many requests in flight, streams reassembled."""

from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.server.conftest import MODEL, LiveServer

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def chat_many(server: LiveServer, seeds, **kw) -> list[Any]:
    """One chat completion per seed, all in flight at once (so the engine batches them)."""
    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(
                client.chat.completions.create(model=MODEL, seed=seed, **{"messages": MESSAGES, "temperature": 1.0,
                                                                          **kw})
                for seed in seeds))

    return asyncio.run(run())


def completions_many(server: LiveServer, seeds, **kw) -> list[Any]:
    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(
                client.completions.create(model=MODEL, seed=seed, **{"temperature": 1.0, **kw}) for seed in seeds))

    return asyncio.run(run())


def choice_of(response: Any) -> Any:
    assert len(response.choices) == 1
    return response.choices[0]


def calls_of(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def reassemble(chunks: list[Any]) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) from a stream's chunks, as a client rebuilds them."""
    content: list[str] = []
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    finish_reasons = []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish_reasons.append(choice.finish_reason)
        if choice.delta.content:
            content.append(choice.delta.content)
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                assert delta.index not in names, "a second header for the same call"
                names[delta.index] = delta.function.name
            assert delta.index in names, "arguments before the call's header"
            arguments.setdefault(delta.index, []).append(delta.function.arguments or "")
    assert all(reason is None for reason in finish_reasons[:-1]), finish_reasons
    assert sorted(names) == list(range(len(names))), names  # indexes 0, 1, ... in order
    calls = [(names[i], "".join(arguments.get(i, []))) for i in sorted(names)]
    return ("".join(content) or None), calls, finish_reasons[-1]


def stream_many(server: LiveServer, seeds, **kw) -> list[tuple[str | None, list[tuple[str, str]], str | None]]:
    async def one(client: openai.AsyncOpenAI, seed: int) -> list[Any]:
        stream = await client.chat.completions.create(model=MODEL, seed=seed, stream=True,
                                                      **{"messages": MESSAGES, **kw})
        return [chunk async for chunk in stream]

    async def run() -> list[list[Any]]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, seed) for seed in seeds))

    return [reassemble(chunks) for chunks in asyncio.run(run())]
