"""POST /v1/responses through the official `openai` client against a live server on the tiny checkpoint.

Greedy Responses output equals the chat completion of the same conversation (the Responses route is the chat
path with another shape), streamed events parse with the client's types in the documented order, tool calls
and `text.format` go through the grammar, and previous_response_id puts the stored turn before the new input.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseItem

from tests.server.conftest import MODEL, LiveServer, make_engine, start_server, stop_server
from tests.server.test_responses_stream import EVENT_CLASSES
from tokenmill.server.app import build_app

needs_llguidance = pytest.mark.skipif(importlib.util.find_spec("llguidance") is None,
                                      reason="needs llguidance (pip install 'tokenmill[test]')")
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
ITEM = pydantic.TypeAdapter(ResponseItem)
GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 12}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)


def chat_of(client: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12, **kw)


def whole_of_hi(client: openai.OpenAI) -> str:
    return client.responses.create(input="Hi", **GREEDY).output_text


def test_plain_response_equals_the_chat_completion(client):
    response = client.responses.create(input="Hello, how are you?", instructions="Be brief.", **GREEDY)
    chat = chat_of(client, [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hello, how are you?"}])
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == chat.usage.total_tokens
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    finished = {"stop": ("completed", None), "length": ("incomplete", "max_output_tokens")}
    status, reason = finished[chat.choices[0].finish_reason]
    assert response.status == status and message.status == status
    assert (response.incomplete_details and response.incomplete_details.reason) == reason


def test_max_output_tokens_cut_is_incomplete(client):
    response = client.responses.create(input="Hi", **{**GREEDY, "max_output_tokens": 3},
                                       extra_body={"ignore_eos": True})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"


def test_stream_events_parse_in_order_and_end_with_the_greedy_text(client, server):
    kwargs = dict(input=[{"role": "user", "content": [{"type": "input_text", "text": "Tell me a story"}]}],
                  extra_body={"ignore_eos": True}, **{**GREEDY, "max_output_tokens": 16})
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[len(deltas) + 4:] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", "response.incomplete"]
    text = "".join(e.delta for e in deltas)
    assert text == whole.output_text == events[-4].text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens == 16
    assert {e.item_id for e in deltas} == {events[2].item.id} == {events[-1].response.output[0].id}
    assert client.responses.retrieve(events[-1].response.id).output_text == text  # stored at the end of the stream
    # Each event's type is also its SSE event line.
    with httpx.stream("POST", server.base_url + "/responses", json={**kwargs["extra_body"], **GREEDY, "stream": True,
                                                                     "input": "Hi"}, timeout=60) as raw:
        lines = [line for line in raw.iter_lines() if line]
    pairs = [(e, json.loads(d.removeprefix("data: "))) for e, d in zip(lines[::2], lines[1::2])]
    assert pairs and all(e == "event: " + data["type"] for e, data in pairs)
    for _, data in pairs:  # strictly, as the client's types require (the client itself parses leniently)
        EVENT_CLASSES[data["type"]].model_validate(data)
    raw = httpx.post(server.base_url + "/responses", json={**GREEDY, "input": "Hi"}, timeout=60).json()
    assert Response.model_validate(raw).output_text == whole_of_hi(client)


def test_previous_response_id_puts_the_stored_turn_first(client):
    first = client.responses.create(input="What is 2+2?", instructions="Answer in words.", **GREEDY)
    second = client.responses.create(input="And 3+3?", previous_response_id=first.id, **GREEDY)
    # Instructions do not carry over; the first turn's input and output do.
    expected = chat_of(client, [{"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": first.output_text},
                                {"role": "user", "content": "And 3+3?"}])
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == expected.usage.prompt_tokens > first.usage.input_tokens
    assert second.output_text == expected.choices[0].message.content
    third = client.responses.create(input="And 4+4?", previous_response_id=second.id, **GREEDY)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens - 1
    # Its input items: the whole conversation before its output, oldest first with order=asc.
    listed = client.responses.input_items.list(third.id, order="asc")
    assert [(item.role, item.content[0].text) for item in listed.data] == [
        ("user", "What is 2+2?"), ("assistant", first.output_text), ("user", "And 3+3?"),
        ("assistant", second.output_text), ("user", "And 4+4?")]
    assert listed.data[1].id == first.output[0].id and not listed.has_more
    newest = client.responses.input_items.list(third.id, limit=2)  # desc by default, a page of 2
    assert [item.id for item in newest.data] == [item.id for item in listed.data[::-1][:2]] and newest.has_more
    rest = client.responses.input_items.list(third.id, after=newest.last_id)
    assert [item.id for item in rest.data] == [item.id for item in listed.data[::-1][2:]] and not rest.has_more


def test_store_false_get_delete_and_cancel(client):
    kept = client.responses.create(input="Hi", **GREEDY)
    assert client.responses.retrieve(kept.id).model_dump() == kept.model_dump()
    with pytest.raises(openai.BadRequestError, match="not created with background=true"):
        client.responses.cancel(kept.id)
    with pytest.raises(openai.BadRequestError, match="no input item of this response has the id 'nope'"):
        client.responses.input_items.list(kept.id, after="nope")
    client.responses.delete(kept.id)
    unkept = client.responses.create(input="Hi", store=False, **GREEDY)
    for gone in (kept.id, unkept.id):
        with pytest.raises(openai.NotFoundError, match="no stored response has the id") as info:
            client.responses.retrieve(gone)
        assert info.value.body["code"] == "response_not_found"
        with pytest.raises(openai.NotFoundError) as info:
            client.responses.create(input="more", previous_response_id=gone, **GREEDY)
        assert info.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError):
            client.responses.cancel(gone)
        with pytest.raises(openai.NotFoundError):
            client.responses.input_items.list(gone)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(gone)


@needs_llguidance
def test_a_forced_tool_call_then_its_output_continues_the_turn(client, server):
    tool_choice = {"type": "function", "name": "get_weather"}
    response = client.responses.create(input="Weather in Paris?", tools=[WEATHER], tool_choice=tool_choice,
                                       **{**GREEDY, "max_output_tokens": 60})
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    # The client's stream helper rebuilds the response from the events (and checks they fit together).
    with client.responses.stream(input="Weather in Paris?", tools=[WEATHER], tool_choice=tool_choice,
                                 **{**GREEDY, "max_output_tokens": 60}) as stream:
        events = list(stream)
        rebuilt = stream.get_final_response().output[0]
    streamed = events[-1].response.output[0]
    assert (streamed.name, streamed.arguments) == (rebuilt.name, rebuilt.arguments) == (call.name, call.arguments)
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [call.arguments]
    # The caller runs the tool and sends its result: once by previous_response_id, once with the whole history.
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}
    chained = client.responses.create(input=[result], previous_response_id=response.id, tools=[WEATHER], **GREEDY)
    explicit = client.responses.create(input=[{"role": "user", "content": "Weather in Paris?"},
                                              {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                               "arguments": call.arguments}, result], tools=[WEATHER], **GREEDY)
    chat = chat_of(client, [{"role": "user", "content": "Weather in Paris?"},
                            {"role": "assistant", "content": None, "tool_calls": [{
                                "id": call.call_id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}]},
                            {"role": "tool", "tool_call_id": call.call_id, "content": '{"temperature": 21}'}],
                   tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}])
    assert chained.usage.input_tokens == explicit.usage.input_tokens == chat.usage.prompt_tokens
    # Both list the same input items, valid as the client's item types (strictly).
    for response in (chained, explicit):
        raw = httpx.get(f"{server.base_url}/responses/{response.id}/input_items", params={"order": "asc"}).json()
        assert [ITEM.validate_python(item).type for item in raw["data"]] == ["message", "function_call",
                                                                             "function_call_output"]
    assert chained.output_text == explicit.output_text == (chat.choices[0].message.content or "")


HERMES_CALL = (r'Sure\. <tool_call>\n\{"name": "get_weather", "arguments": '
               r'\{"city": "[a-z]{1,5}", "unit": "celsius"\}\}\n</tool_call>')


@needs_llguidance
def test_auto_tool_choice_parses_the_models_call_after_its_text(client):
    """A random model never writes <tool_call>; a guided_regex (the chat route's extension) makes it, and the
    parser (hermes, the default for a template without tool markers) splits text and call into two items."""
    kwargs = {"model": MODEL, "input": "Weather?", "tools": [WEATHER], "max_output_tokens": 80,
                  "extra_body": {"guided_regex": HERMES_CALL, "seed": 1}}
    response = client.responses.create(**kwargs)
    message, call = response.output
    assert (message.type, response.output_text, call.type, call.name) == ("message", "Sure.", "function_call",
                                                                         "get_weather")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    events = list(client.responses.create(stream=True, **kwargs))
    assert [(o.type, getattr(o, "arguments", None)) for o in events[-1].response.output] == \
        [("message", None), ("function_call", call.arguments)]
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]
    with pytest.raises(openai.BadRequestError, match="only one output constraint"):
        client.responses.create(text={"format": {"type": "json_object"}}, **kwargs)


class Answer(pydantic.BaseModel):
    ok: bool
    n: int


@needs_llguidance
def test_text_format_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in range(3):
        response = client.responses.create(model=MODEL, input="Answer in JSON", extra_body={"seed": seed},
                                           max_output_tokens=40,
                                           text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                                                            "strict": True}})
        assert response.status == "completed", response
        jsonschema.validate(json.loads(response.output_text), schema)
        assert response.text.format.type == "json_schema"
    parsed = client.responses.parse(model=MODEL, input="Answer in JSON", text_format=Answer, max_output_tokens=40,
                                    temperature=0)
    assert isinstance(parsed.output_parsed, Answer)
    loose = client.responses.create(model=MODEL, input="JSON please", max_output_tokens=60, temperature=0,
                                    text={"format": {"type": "json_object"}})
    assert loose.status == "completed" and isinstance(json.loads(loose.output_text), dict)


def test_a_thinking_model_gives_a_reasoning_item_then_the_answer(think_servers):
    """The template opens <think> and the thinking budget (8) closes it: the chat path's split, as items."""
    plain, _ = think_servers
    client = openai.OpenAI(base_url=plain.base_url, api_key="x", max_retries=0, timeout=60)
    extra = {"ignore_eos": True, "thinking_token_budget": 8}
    response = client.responses.create(input="What is 2 + 2?", extra_body=extra, **{**GREEDY, "max_output_tokens": 20})
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                          temperature=0, max_tokens=20, extra_body=extra)
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.content[0].text == chat.choices[0].message.reasoning_content
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.output_tokens_details.reasoning_tokens == \
        chat.usage.completion_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(input="What is 2 + 2?", extra_body=extra, stream=True,
                                          **{**GREEDY, "max_output_tokens": 20}))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning.content[0].text
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]
    # Given back with previous_response_id, the reasoning item goes with its assistant turn: the input is accepted.
    assert client.responses.create(input="And 3 + 3?", previous_response_id=response.id, extra_body=extra,
                                   **GREEDY).usage.input_tokens > response.usage.input_tokens


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "unsupported item type 'item_reference'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input[0].content[0].type",
     "only text parts"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "must be one of user, assistant"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "only 'function' tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name", "letters, digits"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name",
     "is not among the tools"),
    ({"input": "x", "background": True, "stream": True}, "background", "cannot be streamed"),
    ({"input": "x", "background": True, "store": False}, "background", "must be stored"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning", "not configurable"),
    ({"input": "x", "n": 2}, "n", "n must be 1, got 2"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type", "must be 'text', 'json_object'"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nonsense"}}}},
     "text.format.schema", ""),
    ({"input": "x" * 20000}, "input", "max_model_len"),
    ({"input": []}, "input", "non-empty list"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param, message):
    answer = httpx.post(server.base_url + "/responses", json={"model": MODEL, "max_output_tokens": 2, **body},
                        timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_a_background_response_is_polled_and_can_be_cancelled(client):
    started = client.responses.create(input="Hello, how are you?", background=True, **GREEDY)
    assert started.background and started.status == "in_progress" and started.output == []
    deadline = time.monotonic() + 60
    polled = started
    while polled.status == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.05)
        polled = client.responses.retrieve(started.id)
    foreground = client.responses.create(input="Hello, how are you?", **GREEDY)
    assert polled.status == foreground.status and polled.output_text == foreground.output_text
    assert polled.usage.output_tokens == foreground.usage.output_tokens
    assert client.responses.cancel(started.id).status == polled.status  # finished: cancelling changes nothing
    # A long one (the whole context, EOS ignored) cancelled at once stops early and keeps what it had.
    long = client.responses.create(input="Hi", background=True, model=MODEL, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError, match="still being generated"):
        client.responses.create(input="next", previous_response_id=long.id, **GREEDY)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(long.id).status == "cancelled"
    assert cancelled.usage is None or cancelled.usage.total_tokens < 256
    assert all(item.status == "incomplete" for item in cancelled.output)
    # DELETE stops a running one too, and its end does not store it again.
    deleted = client.responses.create(input="Hi", background=True, model=MODEL, extra_body={"ignore_eos": True})
    client.responses.delete(deleted.id)
    time.sleep(0.5)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(deleted.id)


def test_a_server_that_stores_no_responses(model_dir):
    engine = make_engine(model_dir)
    live = start_server(build_app(engine, MODEL, responses_max_stored=0), engine)
    try:
        client = openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0, timeout=60)
        response = client.responses.create(input="Hi", **GREEDY)
        assert response.store and response.output_text is not None
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response.id)
        with pytest.raises(openai.BadRequestError, match="would not fit the stored responses' bounds") as info:
            client.responses.create(input="Hi", background=True, **GREEDY)
        assert info.value.body["param"] == "background"
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def keyed_server(model_dir) -> Iterator[LiveServer]:
    engine = make_engine(model_dir)
    live = start_server(build_app(engine, MODEL, api_keys=["alpha", "bravo"]), engine)
    yield live
    stop_server(live)


def test_a_stored_response_is_visible_only_to_its_key(keyed_server):
    alpha, bravo = (openai.OpenAI(base_url=keyed_server.base_url, api_key=key, max_retries=0, timeout=60)
                    for key in ("alpha", "bravo"))
    response = alpha.responses.create(input="secret", **GREEDY)
    assert alpha.responses.retrieve(response.id).id == response.id
    with pytest.raises(openai.NotFoundError):
        bravo.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        bravo.responses.create(input="more", previous_response_id=response.id, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        bravo.responses.delete(response.id)
    assert alpha.responses.create(input="more", previous_response_id=response.id, **GREEDY).status
