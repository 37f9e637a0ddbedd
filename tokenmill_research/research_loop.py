"""The research loop: plan -> search (all queries at once) -> judge -> cited section summaries (in
parallel) -> reflect and search again (--reflections N) -> report.

Progress goes to an `on_event(kind, data)` callback (the terminal printer and the web page's SSE stream);
kinds: status, plan, search, judge, section, reflect, report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tokenmill_research.errors import ReplyFormatError, ResearchError
from tokenmill_research.judge import judge_hits
from tokenmill_research.llm_client import LLMClient
from tokenmill_research.planner import PlannedSection, follow_up_queries, make_plan
from tokenmill_research.report import Report, ReportSection
from tokenmill_research.search_tools import SearchTool
from tokenmill_research.writer import summarize

MAX_QUESTION_CHARS = 2000
OnEvent = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ResearchSettings:
    reflections: int = 1
    candidates: int = 6  # hits per query that the judge scores
    evidence: int = 3  # judged hits per section that the summary is written from
    judge: bool = True

    def __post_init__(self) -> None:
        for name, low, high in (("reflections", 0, 5), ("candidates", 1, 50), ("evidence", 1, 20)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ResearchError(f"--{name} must be in [{low}, {high}], got {value}")


def check_question(question: str) -> str:
    question = " ".join(question.split())
    if not question:
        raise ResearchError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise ResearchError(f"the question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    return question


class ResearchRun:
    def __init__(self, client: LLMClient, search: SearchTool, settings: ResearchSettings, on_event: OnEvent) -> None:
        self.client, self.search, self.settings, self.on_event = client, search, settings, on_event

    def _research(self, report: Report, planned: list[PlannedSection]) -> None:
        queries = [s.query for s in planned]
        self.on_event("search", {"queries": queries, "tool": self.search.name})
        hit_lists = self.search.search_many(queries, self.settings.candidates)
        for hits in hit_lists:
            report.retrieved.update((h.chunk.chunk_id, h.chunk) for h in hits)
        if self.settings.judge:
            judged = judge_hits(self.client, queries, hit_lists)
            evidence = [[j.hit.chunk for j in rows[:self.settings.evidence]] for rows in judged]
            self.on_event("judge", {"queries": queries, "relevance": [
                [{"chunk": j.hit.chunk.label, "relevance": round(j.relevance, 3)} for j in rows] for rows in judged]})
        else:
            evidence = [[h.chunk for h in hits[:self.settings.evidence]] for hits in hit_lists]
        # The sections' summaries go to the endpoint together: the server batches them.
        with ThreadPoolExecutor(max_workers=len(planned)) as pool:
            summaries = list(pool.map(lambda pair: summarize(self.client, pair[0].query, pair[1]),
                                      zip(planned, evidence)))
        for section, sentences in zip(planned, summaries):
            report.add_section(ReportSection(section.title, section.query, sentences))
            self.on_event("section", {"title": section.title, "sentences": len(sentences),
                                      "citations": sum(len(s.chunk_ids) for s in sentences)})

    def run(self, question: str) -> Report:
        question = check_question(question)
        start = time.perf_counter()
        report = Report(question)
        self.on_event("status", {"message": "planning"})
        sections, note = make_plan(self.client, question)
        if note:
            report.notes.append(note)
        # The question itself always gets a section: a small model's outline can drift from it.
        planned = [PlannedSection("Answer", question)] + [s for s in sections if s.query != question]
        self.on_event("plan", {"sections": [{"title": s.title, "query": s.query} for s in planned], "note": note})
        self._research(report, planned)
        for round_number in range(1, self.settings.reflections + 1):
            findings = "\n".join(s.text for sec in report.sections for s in sec.sentences)
            try:
                queries = follow_up_queries(self.client, question, findings)
            except ReplyFormatError as exc:
                report.notes.append(f"reflection {round_number} skipped: {exc}")
                break
            asked = {sec.query for sec in report.sections}
            queries = [q for q in queries if q not in asked]
            self.on_event("reflect", {"round": round_number, "queries": queries})
            if not queries:
                break
            self._research(report, [PlannedSection(f"Follow-up: {q}", q) for q in queries])
        seconds = time.perf_counter() - start
        self.on_event("report", {"markdown": report.to_markdown(), "report": report.to_json(),
                                 "seconds": round(seconds, 2)})
        return report
