"""One request can never fail another: for each class of poison request, twelve victim streams running beside
it all finish normally, and the poison request gets its own error (a 400 before it is queued, or its own
error event when it can only fail inside a step)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server.conftest import MODEL

NUM_VICTIMS = 12
VICTIM_TOKENS = 24
RECURSIVE_TOOL = {"type": "function", "function": {"name": "node", "parameters": {
    "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}},
    "$ref": "#/$defs/n"}}}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 8}

# (name, endpoint, raw JSON body, the field its error must name)
POISONS = [
    ("top_k past 2^63", "completions", json.dumps({**COMPLETION, "top_k": 2**63}), "top_k"),
    ("infinite temperature", "completions", json.dumps(COMPLETION)[:-1] + ', "temperature": Infinity}',
     "temperature"),
    ("lone surrogate", "completions", json.dumps(COMPLETION)[:-1] + ', "stop": ["\\ud800"]}', "stop"),
    ("exploding regex", "completions", json.dumps({**COMPLETION, "guided_regex": "x{1000}{1000}"}), "guided_regex"),
    ("recursive tool schema", "chat/completions",
     json.dumps({**CHAT, "tools": [RECURSIVE_TOOL], "tool_choice": "required"}), "tools"),
    ("deep schema", "chat/completions", json.dumps({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "d", "schema": json.loads('{"type": "array", "items": ' * 80 + '{"type": "string"}' + "}" * 80)}}}),
     "response_format"),
]


async def _victim(client: httpx.AsyncClient, index: int) -> tuple[str | None, list[str]]:
    body = {"model": MODEL, "prompt": f"victim {index}", "max_tokens": VICTIM_TOKENS, "ignore_eos": True,
            "stream": True}
    finish, events = None, []
    async with client.stream("POST", "/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            if line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    finish = choice.get("finish_reason") or finish
    return finish, events


async def _poison(client: httpx.AsyncClient, endpoint: str, body: str) -> httpx.Response:
    await asyncio.sleep(0.05)  # let the victims start streaming first
    return await client.post(f"/{endpoint}", content=body.encode("utf-8", "surrogatepass"),
                             headers={"content-type": "application/json"})


@pytest.mark.parametrize(("name", "endpoint", "body", "field"), POISONS, ids=[p[0] for p in POISONS])
def test_poison_request_fails_alone(server, name, endpoint, body, field):
    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            victims = [_victim(client, i) for i in range(NUM_VICTIMS)]
            return await asyncio.gather(_poison(client, endpoint, body), *victims)

    poison, *victims = asyncio.run(main())
    assert poison.status_code == 400, poison.text
    error = poison.json()["error"]
    assert error["param"] is not None and error["param"].startswith(field), error
    for finish, events in victims:
        assert finish == "length", events[-3:]
        assert events[-1] == "data: [DONE]"
        assert not any('"error"' in event for event in events), [e for e in events if '"error"' in e]


def test_a_streamed_request_failing_inside_a_step_gets_its_own_error_event(server):
    """The grammar's costly part starts after 20 characters, past what the compile walks: it compiles, and the
    failure comes mid-stream, to this stream alone."""
    body = json.dumps({**COMPLETION, "guided_regex": "[a-z ]{20}x{1000}{1000}", "max_tokens": 40, "stream": True})

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            victims = [_victim(client, i) for i in range(NUM_VICTIMS)]
            return await asyncio.gather(_poison(client, "completions", body), *victims)

    poison, *victims = asyncio.run(main())
    events = [line for line in poison.text.splitlines() if line.startswith("data: ")]
    errors = [json.loads(e[6:])["error"] for e in events if '"error"' in e]
    assert len(errors) == 1 and errors[0]["param"] == "guided_regex", events
    assert "grammar" in errors[0]["message"] and events[-1] == "data: [DONE]"
    assert all(finish == "length" for finish, _ in victims)


POISON_POSITION = 100  # the victims' tokens never reach this position; the poison's prompt does


async def _greedy_victim(client: httpx.AsyncClient, index: int) -> tuple[str | None, str, list[str]]:
    body = {"model": MODEL, "prompt": f"victim {index}", "max_tokens": VICTIM_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}
    finish, text, events = None, "", []
    async with client.stream("POST", "/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line)
                for choice in [] if line == "data: [DONE]" else json.loads(line[6:]).get("choices", []):
                    text += choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
    return finish, text, events


def test_a_request_that_makes_the_forward_fail_gets_its_error_and_the_victims_their_tokens(server, caplog):
    """A model pass fails only when one request is in it (a test hook in the model, as a kernel bug tripped by
    that request's shape would): the engine finds it by re-running the step's requests, aborts it alone, and the
    victims stream exactly the tokens they stream without it."""
    poison_body = {"model": MODEL, "prompt": list(range(20, 20 + POISON_POSITION + 20)), "max_tokens": 4}

    def after_forward(module, args, output):
        if int(args[1].max()) >= POISON_POSITION:
            raise RuntimeError("kernel fault quoting the poison's secret input")

    async def main(with_poison: bool):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            victims = [_greedy_victim(client, i) for i in range(NUM_VICTIMS)]
            if not with_poison:
                return None, await asyncio.gather(*victims)

            async def poison():
                await asyncio.sleep(0.02)  # in a step beside the victims' decodes, not with their prefills
                return await client.post("/completions", json=poison_body)

            first, *rest = await asyncio.gather(poison(), *victims)
            return first, rest

    _, expected = asyncio.run(main(with_poison=False))
    hook = server.engine.engine.worker.model.model.register_forward_hook(after_forward)
    try:
        poison, victims = asyncio.run(main(with_poison=True))
    finally:
        hook.remove()
    assert poison.status_code == 500, poison.text
    assert "secret" not in poison.text and poison.json()["error"]["type"] == "server_error"
    assert [(finish, text) for finish, text, _ in victims] == [(finish, text) for finish, text, _ in expected]
    for _, _, events in victims:
        assert events[-1] == "data: [DONE]" and not any("error" in event for event in events)
    assert server.engine.num_step_errors == 0
    isolated = [r.getMessage() for r in caplog.records if r.name == "tokenmill.worker.step_isolation"]
    assert isolated and all("because of 1 of them" in m for m in isolated), isolated  # the poison met victims
