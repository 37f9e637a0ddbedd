"""The stored responses' bounds (count, bytes, time to live) and owners; input items as chat messages; the output
items' events for text and tool calls."""

from __future__ import annotations

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.server.errors import APIError
from tokenmill.server.responses_input import chat_messages
from tokenmill.server.responses_output import OutputItems
from tokenmill.server.responses_store import ResponseStore, json_bytes

BODY = {"id": "r", "output": []}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def item(text: str) -> dict:
    return {"role": "user", "content": text}


def test_the_oldest_go_first_at_the_count_bound_and_expired_ones_are_gone():
    clock = Clock()
    store = ResponseStore(max_responses=2, max_bytes=1 << 20, ttl_s=10, clock=clock)
    for name in ("a", "b", "c"):
        assert store.put(name, None, BODY, None, [item(name)])
        clock.now += 4
    with pytest.raises(APIError) as info:
        store.get("a", None)
    assert info.value.status == 404 and info.value.code == "response_not_found"
    assert store.get("b", None).conversation == [item("b")]
    clock.now = 4 + 10  # b was stored at 4: its time is up, c's (at 8) is not
    assert len(store) == 1 and store.get("c", None).body == BODY


def test_the_byte_bound_counts_the_whole_conversation_and_refuses_an_entry_alone_over_it():
    first_size = json_bytes([item("x" * 100)]) + json_bytes(BODY)
    store = ResponseStore(max_responses=10, max_bytes=2 * first_size + 40, ttl_s=60)  # a and b fit, not a third
    assert store.put("a", None, BODY, None, [item("x" * 100)])
    chained = store.get("a", None)
    assert store.put("b", None, BODY, chained, [item("y")])
    assert store.get("b", None).conversation == [item("x" * 100), item("y")]
    assert store.total_bytes == first_size + (first_size + json_bytes([item("y")]))
    assert store.put("c", None, BODY, None, [item("z")])  # over the bound with a and b: a (the oldest) goes
    assert [name for name in "abc" if name in store._entries] == ["b", "c"]
    assert not store.put("d", None, BODY, None, [item("w" * 10 * first_size)])
    assert "d" not in store._entries and len(store) == 2


def test_another_owner_sees_nothing():
    store = ResponseStore()
    store.put("a", "key-1", BODY, None, [item("x")])
    for owner in ("key-2", None):
        with pytest.raises(APIError):
            store.get("a", owner)
        with pytest.raises(APIError):
            store.delete("a", owner)
    store.delete("a", "key-1")
    with pytest.raises(APIError):
        store.get("a", "key-1")


@pytest.mark.parametrize(("flag", "value"), [("--responses-max-stored", "-1"), ("--responses-max-bytes", "-1"),
                                           ("--responses-ttl", "0")])
def test_bad_bounds_stop_serve_before_the_model_loads(tmp_path, flag, value):
    from tokenmill.cli import main

    # The model path does not exist: reaching the model would fail differently, so this error comes first.
    with pytest.raises(SystemExit, match=f"tokenmill serve: {flag} must be"):
        main(["serve", "--model", str(tmp_path / "no-model"), flag, value])


def test_items_become_chat_turns():
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'}
    messages = chat_messages("Be brief.", [
        {"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
        {"type": "message", "role": "user", "content": "Hi"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Calling."}]},
        call, {**call, "call_id": "c2"},
        {"type": "function_call_output", "call_id": "c2", "output": "2"},
    ])
    tool_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert messages == [
        {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Calling.", "reasoning_content": "think",
         "tool_calls": [tool_call, {**tool_call, "id": "c2"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "2", "name": "f"},
    ]
    with pytest.raises(InvalidRequestError) as info:
        chat_messages(None, [item("earlier"), {"type": "computer_call"}], first_index=1)
    assert info.value.field == "input[0].type"


def test_output_items_events_for_text_then_calls():
    output = OutputItems()
    events = output.content([{"content": "  "}])  # whitespace alone opens no message yet
    assert events == []
    events += output.content([{"content": "Sure."},
                              {"tool_calls": [{"index": 0, "id": "call_1",
                                               "function": {"name": "f", "arguments": ""}}]},
                              {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
                              {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                              {"content": "\n"}])
    events += output.finish(incomplete=False)
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done"]
    message, call = output.items
    assert message["content"][0]["text"] == "  Sure." == output.text and message["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == \
        ("call_1", "f", '{"a": 1}', "completed")
    assert [e["output_index"] for e in events if "output_index" in e] == [0] * 6 + [1] * 5


def test_an_empty_answer_is_an_empty_message_and_thinking_cut_off_is_no_message():
    output = OutputItems()
    output.finish(incomplete=False)
    assert [(i["type"], i["content"][0]["text"]) for i in output.items] == [("message", "")]
    thinking = OutputItems()
    thinking.reasoning("hmm")
    thinking.finish(incomplete=True)
    assert [(i["type"], i["status"]) for i in thinking.items] == [("reasoning", "incomplete")]
