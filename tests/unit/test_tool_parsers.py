"""Tool-call parsing: each format's parse(), and streams that add up to parse() for every chunking."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from collections.abc import Callable, Sequence

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.server.tool_parsers import (
    TOOL_PARSERS,
    ParsedToolCalls,
    ToolCall,
    collect_fragments,
    detect_tool_parser,
    fragments_for_calls,
    get_tool_parser,
    new_tool_call_id,
)
from tokenmill.server.tool_parsers.schema import (
    tool_call_json_schema,
    tool_calls_from_forced_json,
    validate_tool_choice,
    validate_tools,
)


def counting_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter):024d}"


CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
CALL2 = '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'
TRICKY = r'{"name": "run", "arguments": {"code": "if a < b: print(\"}{\")\n", "n": [1, {"x": null}], "é": "ü\u00e9"}}'
TRICKY_ARGS = r'{"code": "if a < b: print(\"}{\")\n", "n": [1, {"x": null}], "é": "ü\u00e9"}'
WEATHER = ("get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = ("get_time", '{"tz": "Europe/Paris"}')

# (format, text, expected content, expected [(name, arguments)], a started call breaks when streamed)
Case = tuple[str, str, "str | None", list[tuple[str, str]], bool]
CASES: list[Case] = [
    # hermes
    ("hermes", f"<tool_call>\n{CALL}\n</tool_call>", None, [WEATHER], False),
    ("hermes", f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{CALL2}\n</tool_call>", None, [WEATHER, TIME], False),
    ("hermes", f"Let me check that.\n\n<tool_call>\n{CALL}\n</tool_call>", "Let me check that.", [WEATHER], False),
    ("hermes", "Paris is sunny, 3 < 4 and <tool is not a tag.", "Paris is sunny, 3 < 4 and <tool is not a tag.", [], False),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": }}\n</tool_call>',
     '<tool_call>\n{"name": "f", "arguments": {"a": }}\n</tool_call>', [], True),
    ("hermes", "<tool_call>\n{not json}\n</tool_call> ok", "<tool_call>\n{not json}\n</tool_call> ok", [], False),
    ("hermes", f"<tool_call>\n{CALL}", f"<tool_call>\n{CALL}", [], True),
    ("hermes", f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n[1]\n</tool_call>",
     "\n<tool_call>\n[1]\n</tool_call>", [WEATHER], False),
    ("hermes", f"<tool_call>\n{TRICKY}\n</tool_call>", None, [("run", TRICKY_ARGS)], False),
    ("hermes", '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', None, [("f", '{"a": 1}')], False),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", '{"a": 1}')], False),
    ("hermes", '<tool_call>{"name": "now"}</tool_call>', None, [("now", "{}")], False),
    ("hermes", f"<tool_call>{CALL}</tool_call>\nDone.  ", "\nDone.", [WEATHER], False),
    ("hermes", "  \n", "  \n", [], False),
    # llama3_json
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [WEATHER], False),
    ("llama3_json", '<|python_tag|>' + CALL.replace('"arguments"', '"parameters"') + "; " + CALL2, None,
     [WEATHER, TIME], False),
    ("llama3_json", f"\n  <|python_tag|>{CALL}\n", None, [WEATHER], False),
    ("llama3_json", f"Sure, here it is: {CALL}", f"Sure, here it is: {CALL}", [], False),
    ("llama3_json", "The weather in Paris is mild.", "The weather in Paris is mild.", [], False),
    ("llama3_json", '{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 36}', [], False),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1', '{"name": "f", "parameters": {"a": 1', [], True),
    ("llama3_json", f"{CALL} and more", f"{CALL} and more", [], True),
    ("llama3_json", "<|python_tag|>print(1)", "<|python_tag|>print(1)", [], False),
    ("llama3_json", "<|python", "<|python", [], False),
    # mistral
    ("mistral", f"[TOOL_CALLS][{CALL}]", None, [WEATHER], False),
    ("mistral", f"[TOOL_CALLS] [{CALL}, {CALL2}]", None, [WEATHER, TIME], False),
    ("mistral", f"Let me look.[TOOL_CALLS][{CALL}]", "Let me look.", [WEATHER], False),
    ("mistral", "No tools [needed] here.", "No tools [needed] here.", [], False),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}]', '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}]',
     [], True),
    ("mistral", f"[TOOL_CALLS][{CALL}, ", f"[TOOL_CALLS][{CALL}, ", [], True),
    ("mistral", "[TOOL_CALLS] sorry", "[TOOL_CALLS] sorry", [], False),
    ("mistral", f"[TOOL_CALLS][{TRICKY}] done", " done", [("run", TRICKY_ARGS)], False),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def run_stream(fmt: str, chunks: Sequence[str], stream_arguments: bool) -> tuple[ParsedToolCalls, list[int]]:
    streamer = get_tool_parser(fmt).new_streamer(counting_ids(), stream_arguments=stream_arguments)
    fragments = [f for chunk in chunks for f in streamer.feed(chunk)] + streamer.finish()
    return collect_fragments(fragments), streamer.unfinished_calls


def chunkings(text: str, seed: int) -> list[list[str]]:
    """Every split into two deltas, 1-character deltas, and random chunkings."""
    result = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    result.append(list(text))
    rng = random.Random(seed)
    for _ in range(25):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)]
        result.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return result


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parse(case: Case) -> None:
    fmt, text, content, calls, _ = case
    parsed = get_tool_parser(fmt).parse(text, counting_ids())
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert [c.id for c in parsed.tool_calls] == [f"call_{i:024d}" for i in range(len(calls))]
    for call in parsed.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    if not calls:
        assert parsed.content == text  # without calls the message is untouched


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_held_back_stream_equals_parse_for_every_chunking(case: Case) -> None:
    fmt, text = case[0], case[1]
    expected = get_tool_parser(fmt).parse(text, counting_ids())
    for chunks in chunkings(text, seed=len(text)):
        streamed, unfinished = run_stream(fmt, chunks, stream_arguments=False)
        assert streamed == expected, chunks
        assert unfinished == []


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_incremental_stream_equals_parse_unless_a_started_call_breaks(case: Case) -> None:
    fmt, text, breaks = case[0], case[1], case[4]
    expected = get_tool_parser(fmt).parse(text, counting_ids())
    for chunks in chunkings(text, seed=100 + len(text)):
        streamed, unfinished = run_stream(fmt, chunks, stream_arguments=True)
        assert bool(unfinished) == breaks, chunks
        if not breaks:
            assert streamed == expected, chunks


def random_message(rng: random.Random, fmt: str) -> str:
    """Calls (well-formed or not), near-miss markers and text, glued in random order, maybe cut short."""
    def call(key: str) -> str:
        args = rng.choice(['{}', '{"a": 1}', '{"s": "}{\\"<tool_call>]"}', '"{\\"q\\": 2}"', "null", "5", '{"a": tru}'])
        fields = [f'"name": "{rng.choice(["f", "g_1", ""])}"', f'"{key}": {args}']
        return "{" + ", ".join(rng.sample(fields, k=rng.choice([1, 2, 2, 2]))) + "}"

    def unit() -> str:
        if rng.random() < 0.3:
            return rng.choice(["Hi", " ", "\n", "a < b [x] {y}", "<tool", "[TOOL", "<|py"])
        if fmt == "hermes":
            return f"<tool_call>{rng.choice(['', chr(10)])}{call('arguments')}{rng.choice(['', chr(10), ' x'])}</tool_call>"
        if fmt == "mistral":
            return "[TOOL_CALLS][" + ", ".join(call("arguments") for _ in range(rng.randint(1, 3))) + "]"
        return rng.choice(["", "<|python_tag|>"]) + "; ".join(call("parameters") for _ in range(rng.randint(1, 3)))

    text = "".join(unit() for _ in range(rng.randint(1, 1 if fmt == "llama3_json" else 4)))
    return text[: rng.randint(0, len(text))] if rng.random() < 0.2 else text


@pytest.mark.parametrize("fmt", TOOL_PARSERS)
def test_random_messages_stream_like_they_parse(fmt: str) -> None:
    rng = random.Random(1234)
    for _ in range(150):
        text = random_message(rng, fmt)
        expected = get_tool_parser(fmt).parse(text, counting_ids())
        if not expected.tool_calls:
            assert expected.content == text
        for chunks in rng.sample(chunkings(text, seed=rng.randint(0, 10**6)), k=4):
            held, unfinished = run_stream(fmt, chunks, stream_arguments=False)
            assert held == expected and not unfinished, chunks
            streamed, unfinished = run_stream(fmt, chunks, stream_arguments=True)
            assert unfinished or streamed == expected, chunks


def test_arguments_stream_incrementally_and_header_comes_first() -> None:
    streamer = get_tool_parser("hermes").new_streamer(counting_ids())
    text = f"Hi <tool_call>\n{CALL}\n</tool_call>"
    per_delta = [streamer.feed(ch) for ch in text]
    flat = [f for fragments in per_delta for f in fragments] + streamer.finish()
    tool_deltas = [f["tool_calls"][0] for f in flat if "tool_calls" in f]
    assert tool_deltas[0] == {"index": 0, "id": f"call_{0:024d}", "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}
    arg_pieces = [delta["function"]["arguments"] for delta in tool_deltas[1:]]
    assert len(arg_pieces) > 10 and "".join(arg_pieces) == WEATHER[1]
    assert "".join(f.get("content", "") for f in flat) == "Hi"
    # The header went out before the arguments object was complete.
    first_tool_delta = next(i for i, fragments in enumerate(per_delta) if any("tool_calls" in f for f in fragments))
    assert first_tool_delta < text.index('"city"')


def test_truncated_call_stays_unfinished_when_streamed() -> None:
    streamer = get_tool_parser("hermes").new_streamer(counting_ids())
    fragments = streamer.feed('<tool_call>\n{"name": "f", "arguments": {"a": 1') + streamer.finish()
    parsed = collect_fragments(fragments)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": 1')]
    assert streamer.unfinished_calls == [0] and not streamer.has_tool_calls


@pytest.mark.parametrize(("fmt", "marker"), [("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]"),
                                             ("llama3_json", "<|python_tag|>")])
def test_partial_marker_is_held_back(fmt: str, marker: str) -> None:
    prefix = "" if fmt == "llama3_json" else "Hello"
    streamer = get_tool_parser(fmt).new_streamer(counting_ids())
    assert collect_fragments(streamer.feed(prefix + marker[:-3])).content == (prefix or "")
    # The marker turns out not to be one: the held text is plain content after all.
    rest = streamer.feed("xyz and more") + streamer.finish()
    assert collect_fragments(rest).content == marker[:-3] + "xyz and more"


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_marker_split_across_deltas_opens_a_call(fmt: str) -> None:
    marker, body, closing = ("<tool_call>", CALL, "</tool_call>") if fmt == "hermes" else ("[TOOL_CALLS]", f"[{CALL}", "]")
    streamer = get_tool_parser(fmt).new_streamer(counting_ids())
    fragments = streamer.feed("Ok " + marker[:4])
    fragments += streamer.feed(marker[4:] + body + closing[:5])
    fragments += streamer.feed(closing[5:]) + streamer.finish()
    assert fragments[0] == {"content": "Ok"}
    parsed = collect_fragments(fragments)
    assert parsed.content == "Ok" and [(c.name, c.arguments) for c in parsed.tool_calls] == [WEATHER]
    assert streamer.has_tool_calls and streamer.tool_call_count == 1


def test_registry() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral"}
    for name in TOOL_PARSERS:
        assert get_tool_parser(name).name == name
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_tool_parser("qwen9")
    assert detect_tool_parser("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert detect_tool_parser("[AVAILABLE_TOOLS] [TOOL_CALLS]") == "mistral"
    assert detect_tool_parser("<|python_tag|>{{ x }}") == "llama3_json"
    assert detect_tool_parser("{{ messages }}") is None


def test_default_ids_and_fragment_helpers() -> None:
    call_id = new_tool_call_id()
    assert call_id.startswith("call_") and len(call_id) == 29 and call_id[5:].isalnum()
    calls = [ToolCall("call_a", "f", '{"x": 1}'), ToolCall("call_b", "g", "{}")]
    assert collect_fragments(fragments_for_calls(calls)) == ParsedToolCalls(None, calls)
    assert calls[0].to_openai() == {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}


def test_package_imports_without_fastapi_or_pydantic() -> None:
    # tokenmill.server's own __init__ loads the app; stand in an empty package to import only the parsers.
    code = (
        "import sys, types, tokenmill\n"
        "for name in ('fastapi', 'pydantic', 'starlette', 'uvicorn', 'torch'): sys.modules[name] = None\n"
        "pkg = types.ModuleType('tokenmill.server'); pkg.__path__ = [tokenmill.__path__[0] + '/server']\n"
        "sys.modules['tokenmill.server'] = pkg\n"
        "import tokenmill.server.tool_parsers, tokenmill.server.tool_parsers.schema\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}},
]


@pytest.mark.parametrize(("tools", "field"), [
    ({"type": "function"}, "tools"),
    ([TOOLS[0], "x"], "tools[1]"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([TOOLS[0], {"type": "function", "function": {"name": "bad name!"}}], "tools[1].function.name"),
    ([TOOLS[0], {"type": "function", "function": {"name": "get_weather"}}], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
])
def test_validate_tools_names_the_field(tools: object, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_tools(tools)
    assert info.value.field == field


@pytest.mark.parametrize(("choice", "tools", "field"), [
    ("sometimes", TOOLS, "tool_choice"),
    ("required", None, "tool_choice"),
    ("required", [], "tool_choice"),
    ({"type": "function", "function": {"name": "missing"}}, TOOLS, "tool_choice.function.name"),
    ({"type": "function", "function": {"name": "now"}}, None, "tool_choice"),
    ({"type": "tool", "function": {"name": "now"}}, TOOLS, "tool_choice.type"),
    ({"type": "function"}, TOOLS, "tool_choice.function.name"),
    (3, TOOLS, "tool_choice"),
])
def test_validate_tool_choice_names_the_field(choice: object, tools: list | None, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_tool_choice(choice, tools)
    assert info.value.field == field


def test_valid_tools_and_choices_pass() -> None:
    validate_tools(TOOLS)
    validate_tools(None)
    for choice in (None, "auto", "none", "required", {"type": "function", "function": {"name": "now"}}):
        validate_tool_choice(choice, TOOLS)
    validate_tool_choice("none", None)


def test_required_schema_accepts_calls_and_rejects_wrong_names() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = tool_call_json_schema(TOOLS, "required")
    assert schema is not None
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "now", "parameters": {}}]
    jsonschema.validate(good, schema)
    bad = [
        [],
        [{"name": "get_wether", "parameters": {"city": "Paris"}}],
        [{"name": "get_weather", "parameters": {}}],  # misses the required city
        [{"name": "now", "parameters": {"city": "Paris"}, "extra": 1}],
        {"name": "now", "parameters": {}},
    ]
    for value in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)
    calls = tool_calls_from_forced_json(json.dumps(good), "required", TOOLS, counting_ids())
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        (f"call_{0:024d}", "get_weather", '{"city": "Paris"}'), (f"call_{1:024d}", "now", "{}")]


def test_named_schema_is_the_parameters_object() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    choice = {"type": "function", "function": {"name": "get_weather"}}
    schema = tool_call_json_schema(TOOLS, choice)
    assert schema == TOOLS[0]["function"]["parameters"]
    jsonschema.validate({"city": "Zürich"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"town": "Paris"}, schema)
    calls = tool_calls_from_forced_json('{"city":"Zürich"}', choice, TOOLS, counting_ids())
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Zürich"}')]
    # A tool without parameters takes an empty object.
    assert tool_call_json_schema(TOOLS, {"type": "function", "function": {"name": "now"}}) == {
        "type": "object", "properties": {}}
    assert tool_call_json_schema(TOOLS, "auto") is None and tool_call_json_schema(TOOLS, "none") is None


def test_required_schema_keeps_references_working() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    point = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    tools = [
        {"type": "function", "function": {"name": "draw", "parameters": {
            "type": "object", "$defs": {"Point": point},
            "properties": {"at": {"$ref": "#/$defs/Point"}, "next": {"$ref": "#/properties/at"}},
            "required": ["at"]}}},
        {"type": "function", "function": {"name": "move", "parameters": {
            "type": "object", "definitions": {"Point": {"type": "string"}},
            "properties": {"to": {"$ref": "#/definitions/Point"}}, "required": ["to"]}}},
    ]
    validate_tools(tools)
    schema = tool_call_json_schema(tools, "required")
    jsonschema.validate([{"name": "draw", "parameters": {"at": {"x": 1}, "next": {"x": 2}}},
                         {"name": "move", "parameters": {"to": "home"}}], schema)
    for bad in ([{"name": "draw", "parameters": {"at": {"y": 1}}}], [{"name": "move", "parameters": {"to": {"x": 1}}}],
                [{"name": "draw", "parameters": {"at": {"x": 1}, "next": {"x": "far"}}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = tool_call_json_schema(tools, "required", parallel_tool_calls=False)
    assert single is not None and single["maxItems"] == 1


@pytest.mark.parametrize(("text", "choice"), [
    ('[{"name": "get_weather", "parameters": {"city": "Pa', "required"),
    ('[{"name": "launch", "parameters": {}}]', "required"),
    ("[]", "required"),
    ("[1, 2]", {"type": "function", "function": {"name": "now"}}),
    ("{}", "auto"),
])
def test_forced_json_that_is_not_the_forced_shape_raises(text: str, choice: object) -> None:
    with pytest.raises(ValueError):
        tool_calls_from_forced_json(text, choice, TOOLS)
