"""A scripted OpenAI-compatible endpoint for the research tests: fast, deterministic, no model.

Chats with a json_schema response_format get a plan or follow-up queries; other chats get a summary that
copies words from the first passage shown and carries one valid marker [1] and one invalid marker [99];
completions with logprobs answer " yes" when the passage shares two content words with the question.
Every request body is recorded so tests can assert how many calls of each kind were made.
"""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any

from fastapi import FastAPI, Request

from tests.server.conftest import LiveServer, start_server, stop_server

PLAN = {"sections": [{"title": "Reading files", "query": "iterate over the lines of a file object"},
                     {"title": "Opening files", "query": "open a file for reading in text mode"}]}
FOLLOW_UP = {"queries": ["readline method returns one line"]}
_WORD = re.compile(r"[a-z]{4,}")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


class FakeEndpoint:
    def __init__(self, plan: Any = PLAN, follow_up: Any = FOLLOW_UP, raw_plan: str | None = None) -> None:
        self.plan, self.follow_up, self.raw_plan = plan, follow_up, raw_plan
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.post("/v1/completions")(self._completions)
        self.app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "fake", "object": "model",
                                                                        "created": 0, "owned_by": "test"}]})
        self.live: LiveServer | None = None

    def start(self) -> str:
        self.live = start_server(self.app, None)
        return self.live.base_url

    @property
    def base_url(self) -> str:
        assert self.live is not None, "start() the endpoint first"
        return self.live.base_url

    def stop(self) -> None:
        if self.live:
            stop_server(self.live)

    def calls(self, kind: str) -> list[dict]:
        return [body for k, body in self.requests if k == kind]

    async def _chat(self, request: Request) -> dict:
        body = await request.json()
        with self.lock:
            self.requests.append(("chat", body))
        schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema", {})
        if "sections" in schema.get("properties", {}):
            content = self.raw_plan if self.raw_plan is not None else json.dumps(self.plan)
        elif "queries" in schema.get("properties", {}):
            content = json.dumps(self.follow_up)
        else:
            prompt = body["messages"][-1]["content"]
            first = re.search(r"\[1\] \([^)]*\) (.*)", prompt)
            words = " ".join(first.group(1).split()[:12]) if first else "nothing found"
            content = f"The documentation says {words} [1]. Something unrelated is claimed here [99]."
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    async def _completions(self, request: Request) -> dict:
        body = await request.json()
        with self.lock:
            self.requests.append(("completions", body))
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            question = re.search(r"Question: (.*)", prompt).group(1)
            passage = prompt.split("Passage", 1)[1]
            p_yes = 0.9 if len(_words(question) & _words(passage)) >= 2 else 0.1
            top = {" yes": math.log(p_yes), " no": math.log(1 - p_yes)}
            choices.append({"index": index, "text": " yes" if p_yes > 0.5 else " no", "finish_reason": "length",
                            "logprobs": {"tokens": [" yes"], "token_logprobs": [top[" yes"]],
                                         "top_logprobs": [top], "text_offset": [0]}})
        return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
