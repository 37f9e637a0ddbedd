"""The research loop against a scripted endpoint: plan, batched judge, cited sections, reflection, report;
citations valid by construction; bad input and a down endpoint give clear errors."""

from __future__ import annotations

import re
import socket

import pytest

from tests.research.fake_endpoint import PLAN, FakeEndpoint
from tokenmill_research.chunking import Chunk
from tokenmill_research.errors import EndpointError, ResearchError
from tokenmill_research.llm_client import LLMClient
from tokenmill_research.planner import PLAN_SCHEMA
from tokenmill_research.report import Report, ReportSection
from tokenmill_research.research_loop import MAX_QUESTION_CHARS, ResearchRun, ResearchSettings
from tokenmill_research.search_tools import CorpusSearch
from tokenmill_research.writer import CitedSentence, attribute

QUESTION = "How do I read a file line by line?"


def _run(retriever, endpoint: FakeEndpoint, **settings):
    events: list[tuple[str, dict]] = []
    run = ResearchRun(LLMClient(endpoint.base_url, "fake"), CorpusSearch(retriever), ResearchSettings(**settings),
                      lambda kind, data: events.append((kind, data)))
    return run.run(QUESTION), events


def test_a_report_cites_only_retrieved_chunks_and_numbers_its_sources(retriever, fake_endpoint) -> None:
    report, events = _run(retriever, fake_endpoint, reflections=1)
    kinds = [k for k, _ in events]
    assert kinds == ["status", "plan", "search", "judge", "section", "section", "section", "reflect", "search",
                     "judge", "section", "report"]
    assert [s.title for s in report.sections] == ["Answer", "Reading files", "Opening files",
                                                  "Follow-up: readline method returns one line"]
    plan_call = fake_endpoint.calls("chat")[0]
    assert plan_call["response_format"]["json_schema"]["schema"] == PLAN_SCHEMA
    assert len(fake_endpoint.calls("completions")) == 2  # one batched judge call per round
    cited = [c for s in report.sections for x in s.sentences for c in x.chunk_ids]
    assert cited and set(cited) <= set(report.retrieved)
    markdown = report.to_markdown()
    assert "[99]" not in markdown
    numbers = report.citation_numbers()
    assert sorted(numbers.values()) == list(range(1, len(numbers) + 1))
    used = {int(n) for n in re.findall(r"\[(\d+)\]", markdown.split("## Sources")[0])}
    assert used == set(numbers.values())
    sources = markdown.split("## Sources")[1]
    for chunk_id, number in numbers.items():
        chunk = report.retrieved[chunk_id]
        assert f"{number}. {chunk.context} ({chunk.source}, chunk {chunk.label})" in sources


def test_without_reflection_or_judge_there_is_no_judge_call(retriever, fake_endpoint) -> None:
    report, events = _run(retriever, fake_endpoint, reflections=0, judge=False)
    assert fake_endpoint.calls("completions") == []
    assert "reflect" not in [k for k, _ in events] and len(report.sections) == 3


def test_an_endpoint_that_ignores_the_schema_still_gets_a_report(retriever) -> None:
    endpoint = FakeEndpoint(raw_plan="Sure! Here is a plan: 1. files 2. lines")
    endpoint.start()
    try:
        report, events = _run(retriever, endpoint, reflections=0)
    finally:
        endpoint.stop()
    assert [s.title for s in report.sections] == ["Answer"]
    assert report.notes and report.notes[0].startswith("plan not usable (the model's reply is not the JSON")
    assert dict(events)["plan"]["note"] == report.notes[0]


def test_a_down_endpoint_is_a_clear_error(retriever) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = LLMClient(f"http://127.0.0.1:{port}/v1", "fake", timeout_s=5)
    run = ResearchRun(client, CorpusSearch(retriever), ResearchSettings(), lambda kind, data: None)
    with pytest.raises(EndpointError, match=rf"cannot reach the model endpoint http://127.0.0.1:{port}/v1"):
        run.run(QUESTION)


def test_a_huge_or_empty_question_is_refused(retriever, fake_endpoint) -> None:
    run = ResearchRun(LLMClient(fake_endpoint.base_url, "fake"), CorpusSearch(retriever), ResearchSettings(),
                      lambda kind, data: None)
    with pytest.raises(ResearchError, match=f"the question is 102400 characters; the limit is {MAX_QUESTION_CHARS}"):
        run.run("x" * 102400)
    with pytest.raises(ResearchError, match="the question is empty"):
        run.run("  \n ")
    assert fake_endpoint.requests == []
    with pytest.raises(ResearchError, match=r"--reflections must be in \[0, 5\], got 9"):
        ResearchSettings(reflections=9)


def _chunk(chunk_id: int, text: str) -> Chunk:
    return Chunk(chunk_id, "doc.md", "Doc", ("Part",), text)


def test_attribution_keeps_valid_markers_drops_invalid_ones_and_cites_by_shared_words() -> None:
    evidence = [_chunk(10, "The readline method returns the next line of the file."),
                _chunk(11, "The write method writes a string to the stream.")]
    sentences = attribute("Use readline [1]. Strings are written with the write method to a stream [7]. "
                          "Bananas are yellow.", evidence)
    assert sentences == [CitedSentence("Use readline.", [10]),
                         CitedSentence("Strings are written with the write method to a stream.", [11]),
                         CitedSentence("Bananas are yellow.", [])]


def test_a_cut_off_last_sentence_and_repeats_are_dropped() -> None:
    evidence = [_chunk(10, "The readline method returns the next line of the file.")]
    sentences = attribute("Use readline [1]. Use readline [1]. The function also", evidence)
    assert sentences == [CitedSentence("Use readline.", [10])]


def test_a_report_refuses_a_citation_of_a_chunk_it_did_not_retrieve() -> None:
    report = Report("q", retrieved={10: _chunk(10, "text")})
    report.add_section(ReportSection("A", "q", [CitedSentence("ok.", [10])]))
    with pytest.raises(ValueError, match=r"cites chunk\(s\) \[11\] that were not retrieved"):
        report.add_section(ReportSection("B", "q", [CitedSentence("bad.", [11])]))
    assert len(report.sections) == 1


def test_the_plan_fake_matches_the_schema() -> None:
    """The scripted plan obeys the schema the planner sends (so the tests above exercise the parsed path)."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(PLAN, PLAN_SCHEMA)
