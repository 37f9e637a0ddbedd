"""Hybrid retrieval: dense (MiniLM + FAISS) and lexical (BM25 via bm25s) rankings fused by reciprocal rank.

Reciprocal rank fusion scores a chunk by the sum over rankings of 1 / (RRF_K + rank): it needs no score
calibration between the two retrievers, and a chunk found by both outranks one found high by only one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill_research.chunking import Chunk
from tokenmill_research.corpus_store import CorpusStore

RRF_K = 60
CANDIDATES_PER_RETRIEVER = 40
MODES = ("hybrid", "dense", "bm25")


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


class Retriever:
    def __init__(self, store: CorpusStore) -> None:
        import bm25s

        import Stemmer

        self.store = store
        self._ids = sorted(store.chunks)
        self._stemmer = Stemmer.Stemmer("english")  # "prints" finds "print", "files" finds "file"
        # BM25 is rebuilt from the stored chunks on open: a few hundred ms for thousands of chunks, and it
        # then always agrees with the chunk table.
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize([store.chunks[i].indexed_text for i in self._ids], stopwords="en",
                                        stemmer=self._stemmer, show_progress=False), show_progress=False)

    def bm25_rankings(self, queries: list[str], k: int) -> list[list[int]]:
        import bm25s

        k = min(k, len(self._ids))
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=self._stemmer, return_ids=False,
                                show_progress=False)
        rankings = []
        for query_tokens in tokens:
            if not query_tokens:  # a query of only stopwords: no lexical evidence at all
                rankings.append([])
                continue
            docs, scores = self._bm25.retrieve([query_tokens], k=k, show_progress=False)
            rankings.append([self._ids[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0])
        return rankings

    def dense_rankings(self, queries: list[str], k: int) -> list[list[int]]:
        return self.store.dense_search(self.store.embedder.encode(queries), k)

    def search_many(self, queries: list[str], k: int, mode: str = "hybrid") -> list[list[Hit]]:
        """The top k chunks per query; mode is hybrid, dense or bm25."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        depth = max(k, CANDIDATES_PER_RETRIEVER)
        dense = self.dense_rankings(queries, depth) if mode != "bm25" else [[] for _ in queries]
        lexical = self.bm25_rankings(queries, depth) if mode != "dense" else [[] for _ in queries]
        results = []
        for d, b in zip(dense, lexical):
            fused = reciprocal_rank_fusion([r for r in (d, b) if r])[:k]
            results.append([Hit(self.store.chunks[i], score) for i, score in fused])
        return results

    def search(self, query: str, k: int, mode: str = "hybrid") -> list[Hit]:
        return self.search_many([query], k, mode)[0]
