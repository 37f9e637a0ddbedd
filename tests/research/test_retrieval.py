"""Hybrid retrieval (dense + BM25 fused by reciprocal rank) and the LLM judge's batched re-rank."""

from __future__ import annotations

import pytest

from tokenmill_research.judge import UNDECIDED, judge_hits
from tokenmill_research.llm_client import LLMClient
from tokenmill_research.retrieval import RRF_K, reciprocal_rank_fusion


def test_reciprocal_rank_fusion_adds_one_over_k_plus_rank() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]])
    assert fused == [(1, 1 / (RRF_K + 1) + 1 / (RRF_K + 2)), (3, 1 / (RRF_K + 3) + 1 / (RRF_K + 1)),
                     (2, 1 / (RRF_K + 2))]


def test_each_mode_finds_the_passage_that_answers(retriever) -> None:
    for mode in ("hybrid", "dense", "bm25"):
        top = retriever.search("which statement ends the nearest enclosing loop", 1, mode)[0].chunk
        assert top.source == "loops.txt" and "break statement" in top.text, mode
    top = retriever.search("loop over each line of a big file without using much memory", 1, "dense")[0].chunk
    assert top.context == "Reading files > Line by line"


def test_a_query_of_stopwords_has_no_lexical_hits_and_hybrid_still_answers(retriever) -> None:
    assert retriever.search("the of and", 3, "bm25") == []
    assert len(retriever.search("the of and", 3, "hybrid")) == 3


def test_an_unknown_mode_is_refused(retriever) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        retriever.search("x", 1, "sparse")


def test_the_judge_scores_every_candidate_in_one_call_and_reorders(retriever, fake_endpoint) -> None:
    client = LLMClient(fake_endpoint.base_url, "fake")
    queries = ["iterate over lines of a file", "break statement loop"]
    hit_lists = retriever.search_many(queries, 4)
    judged = judge_hits(client, queries, hit_lists)
    assert len(fake_endpoint.calls("completions")) == 1
    assert len(fake_endpoint.calls("completions")[0]["prompt"]) == sum(len(h) for h in hit_lists)
    for rows, hits in zip(judged, hit_lists):
        assert sorted(r.hit.chunk.chunk_id for r in rows) == sorted(h.chunk.chunk_id for h in hits)
        assert [r.relevance for r in rows] == sorted((r.relevance for r in rows), reverse=True)
        assert {round(r.relevance, 6) for r in rows} <= {0.9, 0.1, UNDECIDED}
    assert "break statement" in judged[1][0].hit.chunk.text
