"""Tool calling and structured output through the official `openai` client against a live server.

The tiny checkpoint emits noise, so a tool call that parses and validates is the grammar's doing: forced
tool choices (named or "required") always give calls whose arguments fit the tool's schema, streamed or
not; `response_format` and `guided_*` hold for every seed; bad schemas and tools are 400s naming the field.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL, LiveServer, make_engine, start_server, stop_server
from tests.server.openai_helpers import (
    MESSAGES,
    calls_of,
    chat_many,
    choice_of,
    completions_many,
    reassemble,
    stream_many,
)
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.llm import LLM
from tokenmill.server.app import build_app

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(importlib.util.find_spec("llguidance") is None,
                                 reason="needs llguidance (pip install 'tokenmill[test]')")]

SEEDS = range(50)


def function_tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": f"The {name} tool", "parameters": parameters}}


WEATHER = function_tool("get_weather", {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
})
SEARCH = function_tool("search", {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 6},
        "limit": {"type": "integer", "minimum": 1, "maximum": 20},
    },
    "required": ["query"],
    "additionalProperties": False,
})
# Calls of a few tokens each: arrays of several of them usually end within max_tokens.
PING = function_tool("ping", {"type": "object", "properties": {}, "additionalProperties": False})
LIGHT = function_tool("light", {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
                                "additionalProperties": False})
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, SEARCH, PING, LIGHT)}
NAMED = {"type": "function", "function": {"name": "get_weather"}}

# A Hermes / Qwen2.5-style template: tools in the system turn, <tool_call> blocks, <tool_response> turns.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool['function']['name'] }} {% endfor %}"
    "</tools>\nCall as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined %}"
    "<|im_start|>assistant\n{{ message['content'] if message['content'] is defined else '' }}"
    "{%- for call in message['tool_calls'] %}<tool_call>\n{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# What a turn looks like after the model called a tool and the caller answered with its result.
AFTER_TOOL_CALL = MESSAGES + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]



@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveServer]:
    engine = make_engine(model_dir)
    server = start_server(build_app(engine, MODEL), engine)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def hermes_live(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("tiny-hermes")
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = HERMES_TEMPLATE
    config_file.write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    # The tools and the earlier tool turn make long prompts for the tiny tokenizer: a longer context.
    llm = LLM(str(folder), dtype="float32", max_model_len=1024, max_num_seqs=16, num_kv_blocks=256, seed=0)
    engine = AsyncLLMEngine(llm.engine)
    server = start_server(build_app(engine, MODEL), engine)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0)


def check_call(call: Any, names: set[str]) -> None:
    assert call.type == "function" and call.id, call
    assert call.function.name in names, call
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


# ---- forced tool choice ----------------------------------------------------------------------------------


def test_named_tool_choice_gives_exactly_that_call_for_50_seeds(live):
    responses = chat_many(live, SEEDS, tools=[WEATHER, SEARCH], tool_choice=NAMED, max_tokens=200)
    for response in responses:
        choice = choice_of(response)
        assert choice.finish_reason == "stop", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1, choice.message
        check_call(choice.message.tool_calls[0], {"get_weather"})
    assert len({calls_of(r.choices[0].message)[0][1] for r in responses}) > 40  # sampled, not one answer
    ids = [r.choices[0].message.tool_calls[0].id for r in responses]
    assert len(set(ids)) == len(ids)


def test_required_without_parallel_calls_gives_one_valid_call_for_50_seeds(live):
    responses = chat_many(live, SEEDS, tools=[WEATHER, SEARCH], tool_choice="required", parallel_tool_calls=False,
                          max_tokens=200)
    names: set[str] = set()
    for response in responses:
        choice = choice_of(response)
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1, choice.message
        check_call(choice.message.tool_calls[0], {"get_weather", "search"})
        names.add(choice.message.tool_calls[0].function.name)
    assert names == {"get_weather", "search"}  # the model picks either tool: both are reachable


def check_required_responses(responses: list[Any], names: set[str], max_tokens: int) -> list[int]:
    """Every finished response is one or more valid calls of the tools. With parallel calls the array
    has no length limit and a random model sometimes goes on adding calls until max_tokens: such a
    response is the cut-off JSON as content, and it must stay the exception. Returns the call counts."""
    counts = []
    for response in responses:
        choice = choice_of(response)
        if choice.finish_reason == "length":
            assert response.usage.completion_tokens == max_tokens, response
            assert choice.message.content.startswith('[{"name": "') and not choice.message.tool_calls, choice
            continue
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and choice.message.tool_calls, choice.message
        for call in choice.message.tool_calls:
            check_call(call, names)
        counts.append(len(choice.message.tool_calls))
    assert len(counts) >= 0.6 * len(responses), [choice_of(r).finish_reason for r in responses]
    return counts


def test_parallel_calls_of_small_tools(live):
    """Tools whose calls take a few tokens, so arrays of several calls fit: many responses have >= 2."""
    responses = chat_many(live, range(30), tools=[PING, LIGHT], tool_choice="required", max_tokens=200)
    counts = check_required_responses(responses, {"ping", "light"}, 200)
    assert sum(count >= 2 for count in counts) >= 5, counts


def check_streams_match(streamed: list[Any], whole: list[Any]) -> None:
    for seed, (content, calls, finish_reason), response in zip(SEEDS, streamed, whole):
        expected = choice_of(response)
        assert calls == calls_of(expected.message), seed
        assert content == expected.message.content, seed
        assert finish_reason == expected.finish_reason, seed


def test_required_with_parallel_calls_for_50_seeds_streamed_or_not(live):
    kw = {"tools": [WEATHER, SEARCH], "tool_choice": "required", "max_tokens": 200}
    whole = chat_many(live, SEEDS, **kw)
    counts = check_required_responses(whole, {"get_weather", "search"}, 200)
    assert max(counts) >= 2, counts
    assert {c.function.name for r in whole for c in r.choices[0].message.tool_calls or []} == {"get_weather", "search"}
    # The same seeds streamed: the deltas (by index) rebuild the same calls, cut-off content and finish_reason.
    check_streams_match(stream_many(live, SEEDS, **kw), whole)


def test_named_tool_choice_streamed_matches_non_streamed(live):
    kw = {"tools": [WEATHER, SEARCH], "tool_choice": NAMED, "max_tokens": 200}
    streamed = stream_many(live, range(10), **kw)
    check_streams_match(streamed, chat_many(live, range(10), **kw))
    assert all(reason == "stop" and len(calls) == 1 for _, calls, reason in streamed), streamed


# ---- auto mode (hermes) ----------------------------------------------------------------------------------


def test_auto_mode_renders_a_prior_tool_call_and_answers(hermes_live):
    client = openai.OpenAI(base_url=hermes_live.base_url, api_key="x", max_retries=0)
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=16, seed=0)
    after = client.chat.completions.create(model=MODEL, messages=AFTER_TOOL_CALL, tools=[WEATHER], tool_choice="auto",
                                           max_tokens=16, seed=0)
    choice = choice_of(after)
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and choice.message.content, choice.message
    assert not choice.message.tool_calls
    # The assistant's call and the tool's answer were rendered into the prompt.
    assert after.usage.prompt_tokens > first.usage.prompt_tokens + 20


@pytest.mark.parametrize("content", ["", None])
def test_default_template_renders_a_tool_turn(client, content):
    # OpenAI clients send content null on an assistant message that only calls tools.
    messages = [dict(m, content=content) if m["role"] == "assistant" else m for m in AFTER_TOOL_CALL]
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8, seed=0)
    assert choice_of(response).finish_reason in ("stop", "length")


HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": '
               r'\{"city": "[a-z]{1,5}", "unit": "celsius", "days": [1-7]\}\}\n</tool_call>')


def test_auto_mode_parses_a_hermes_call_in_the_output(hermes_live):
    """A random model never writes <tool_call>; a guided_regex makes it, and the hermes parser must
    turn the block into a tool call, streamed or not."""
    client = openai.OpenAI(base_url=hermes_live.base_url, api_key="x", max_retries=0)
    kw = {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 150, "temperature": 1.0,
          "extra_body": {"guided_regex": HERMES_CALL}}
    for seed in range(3):
        choice = choice_of(client.chat.completions.create(model=MODEL, seed=seed, **kw))
        assert choice.finish_reason == "tool_calls", choice
        assert not choice.message.content and len(choice.message.tool_calls) == 1, choice.message
        check_call(choice.message.tool_calls[0], {"get_weather"})
        streamed = reassemble(list(client.chat.completions.create(model=MODEL, seed=seed, stream=True, **kw)))
        assert streamed == (None, calls_of(choice.message), "tool_calls")
    # tool_choice "none": the same text stays content.
    choice = choice_of(client.chat.completions.create(model=MODEL, seed=0, **{**kw, "tool_choice": "none"}))
    assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice
    assert re.fullmatch(HERMES_CALL, choice.message.content), choice.message


# ---- response_format and guided_* ------------------------------------------------------------------------

ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["title", "count", "colors"],
    "additionalProperties": False,
}


def test_response_format_json_schema_holds_for_every_seed(live):
    response_format = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM_SCHEMA}}
    for response in chat_many(live, range(12), response_format=response_format, max_tokens=200):
        choice = choice_of(response)
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), ITEM_SCHEMA)


def test_response_format_json_object_gives_objects(live):
    # Any object: a random model mostly closes it at once or rambles in a string until max_tokens.
    responses = chat_many(live, range(20), messages=[{"role": "user", "content": "Give me a JSON object."}],
                          response_format={"type": "json_object"}, max_tokens=220)
    finished = [choice_of(r).message.content for r in responses if choice_of(r).finish_reason == "stop"]
    assert len(finished) >= 0.75 * len(responses), [choice_of(r) for r in responses]
    assert all(isinstance(json.loads(text), dict) for text in finished), finished


def test_guided_json_on_chat(live):
    for response in chat_many(live, range(8), max_tokens=200, extra_body={"guided_json": ITEM_SCHEMA}):
        assert choice_of(response).finish_reason == "stop"
        jsonschema.validate(json.loads(choice_of(response).message.content), ITEM_SCHEMA)


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_regex": r"[0-9]{3}-[0-9]{4}"}, lambda text: re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)),
    ({"guided_choice": ["red", "green", "blue sky"]}, lambda text: text in ("red", "green", "blue sky")),
    ({"guided_grammar": 'root ::= "x=" [1-9] [0-9]? (", y=" [0-9])?'},
     lambda text: re.fullmatch(r"x=[1-9][0-9]?(, y=[0-9])?", text)),
    ({"guided_json": ITEM_SCHEMA}, lambda text: jsonschema.validate(json.loads(text), ITEM_SCHEMA) is None),
], ids=["regex", "choice", "grammar", "json"])
def test_guided_constraints_on_completions(live, extra, check):
    responses = completions_many(live, range(10), prompt="Hello", max_tokens=200, extra_body=extra)
    for response in responses:
        choice = choice_of(response)
        assert choice.finish_reason == "stop" and check(choice.text), choice


# ---- errors ----------------------------------------------------------------------------------------------


ERRORS = [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("chat", {"extra_body": {"guided_regex": "(ab"}}, "guided_regex"),
    ("completions", {"extra_body": {"guided_regex": "[0-9"}}, "guided_regex"),
    ("chat", {"extra_body": {"guided_grammar": "root ::= missing_rule"}}, "guided_grammar"),
    ("completions", {"extra_body": {"guided_grammar": "this is not a grammar"}}, "guided_grammar"),
    ("completions", {"extra_body": {"guided_choice": []}}, "guided_choice"),
    ("chat", {"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]},
     "tools[0].function.name"),
    ("chat", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "send_email"}}},
     "tool_choice.function.name"),
    ("chat", {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice"),
    ("chat", {"tools": [WEATHER], "tool_choice": "required", "extra_body": {"guided_regex": "[a-z]+"}},
     "tool_choice"),
    ("chat", {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "[a-z]+"}},
     "guided_regex"),
    ("chat", {"extra_body": {"guided_json": {"type": "nope"}}}, "guided_json"),
    ("chat", {"tools": [function_tool("f", {"type": "object", "properties": {"a": {"type": "nope"}}})],
              "tool_choice": "required"}, "tools"),
]


@pytest.mark.parametrize(("endpoint", "kw", "param"), ERRORS, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(ERRORS)])
def test_bad_constraints_and_tools_are_400_naming_the_field(live, client, endpoint, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, **kw)
        else:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, **kw)
    error = info.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(param), error


def test_the_server_serves_on_after_the_bad_requests(live, client):
    for endpoint, kw, _ in ERRORS:
        with pytest.raises(openai.BadRequestError):
            if endpoint == "chat":
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, **kw)
            else:
                client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, **kw)
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice=NAMED,
                                              max_tokens=200, seed=3, temperature=1.0)
    check_call(choice_of(response).message.tool_calls[0], {"get_weather"})
    assert httpx.get(f"{live.root}/health").status_code == 200
    assert live.engine.stats()["num_running"] == 0  # nothing left behind by the refused requests
