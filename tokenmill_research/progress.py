"""The research loop's events as lines on the terminal."""

from __future__ import annotations

import sys
import time
from typing import Any


class TerminalProgress:
    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.start = time.perf_counter()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        line = self._describe(kind, data)
        if line:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {line}", file=self.stream, flush=True)

    @staticmethod
    def _describe(kind: str, data: dict[str, Any]) -> str | None:
        if kind == "status":
            return data["message"]
        if kind == "plan":
            titles = "; ".join(f"{s['title']} ({s['query']})" for s in data["sections"])
            return f"plan: {titles}" + (f" [{data['note']}]" if data.get("note") else "")
        if kind == "search":
            return f"searching the {data['tool']} for {len(data['queries'])} queries"
        if kind == "judge":
            kept = sum(len(r) for r in data["relevance"])
            return f"judged {kept} passages for relevance"
        if kind == "section":
            return f"wrote '{data['title']}': {data['sentences']} sentences, {data['citations']} citations"
        if kind == "reflect":
            queries = "; ".join(data["queries"]) or "no new queries"
            return f"reflection {data['round']}: {queries}"
        if kind == "report":
            return f"report written in {data['seconds']:.1f} s"
        return None
