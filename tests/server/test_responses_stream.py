"""The Responses event stream without a model: every event validates against the `openai` client's own
ResponseStreamEvent (strictly, not the lenient construct the client uses), and a failure after the stream began
is an `error` event then `response.failed`."""

from __future__ import annotations

import asyncio
import json
import typing
from types import SimpleNamespace
from typing import Any

import pytest

from tokenmill.config import ThinkingConfig
from tokenmill.errors import RequestFailedError
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.responses_protocol import ResponsesRequest
from tokenmill.server.serving_chat import ChatPlan
from tokenmill.server.serving_responses import ResponseTurn, _events
from tokenmill.server.serving_tools import ToolPlan

responses_types = pytest.importorskip("openai.types.responses")
# The client's event class for each event type, read off its union (each member's `type` is one Literal).
EVENT_CLASSES = {member.model_fields["type"].annotation.__args__[0]: member
                 for member in typing.get_args(typing.get_args(responses_types.ResponseStreamEvent)[0])}
STATE = SimpleNamespace(reasoning_enabled=True, thinking_config=ThinkingConfig(), thinking=None,
                        tags_are_skipped_specials=False, other_specials=[], model_name="tiny")


class FakeStream:
    """A request stream that yields the given outputs, then raises `error` if one is given."""

    def __init__(self, outputs: list[RequestOutput], error: BaseException | None = None) -> None:
        self.outputs, self.error, self.aborted = outputs, error, False

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        for output in self.outputs:
            yield output
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.aborted = True


class Tracker:
    def observe(self, output: RequestOutput) -> None:
        pass

    def abandon(self) -> None:
        pass


def delta(text: str, finish_reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, text, [7] * len(text), finish_reason)],
                         finished=finish_reason is not None)


def run(body: dict[str, Any], stream: FakeStream) -> tuple[list[Any], list[dict[str, Any]]]:
    request = ResponsesRequest.model_validate({"stream": True, **body})
    tools = ToolPlan(None, None, True, "", None)
    turn = ResponseTurn(STATE, request, ChatPlan(STATE, request, "prompt", tools), "resp_1")
    kept: list[dict[str, Any]] = []

    async def collect() -> list[str]:
        return [chunk async for chunk in _events(turn, [stream], [Tracker()], kept.append)]

    events = []
    for chunk in asyncio.run(collect()):
        event_line, data_line = chunk.strip().split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        assert event_line == "event: " + payload["type"]
        events.append(EVENT_CLASSES[payload["type"]].model_validate(payload))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert stream.aborted
    return events, kept


def test_reasoning_then_text_events_validate_and_the_response_is_kept():
    events, kept = run({"input": "x"}, FakeStream([delta("<think>plan"), delta(" more</think>The"),
                                                   delta(" answer.", "stop")]))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    final = events[-1].response
    assert final.output[0].content[0].text == "plan more" and final.output_text == "The answer."
    assert final.usage.output_tokens == len("<think>plan more</think>The answer.")
    assert [(k["id"], k["status"], k["output"][1]["content"][0]["text"]) for k in kept] == \
        [("resp_1", "completed", "The answer.")]


def test_a_failure_mid_stream_is_an_error_event_then_response_failed():
    events, kept = run({"input": "x"}, FakeStream([delta("Hel")], RequestFailedError("the grammar took too long",
                                                                                     field="text.format")))
    assert [e.type for e in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
    error, failed = events[-2:]
    assert (error.param, error.message) == ("text.format", "the grammar took too long")
    assert failed.response.status == "failed" and failed.response.error.message == "the grammar took too long"
    assert kept == []  # a failed stream is not stored
