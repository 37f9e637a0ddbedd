"""Where the research loop searches: a small interface, the local corpus by default.

Another source (a web search, a database) is a class with `name` and `search_many` that returns Hits whose
chunks carry ids unique within the run; the loop treats every source alike.
"""

from __future__ import annotations

from typing import Protocol

from tokenmill_research.retrieval import Hit, Retriever


class SearchTool(Protocol):
    name: str

    def search_many(self, queries: list[str], k: int) -> list[list[Hit]]:
        """The best k hits per query, best first."""
        ...


class CorpusSearch:
    """Hybrid retrieval over the indexed --docs folder."""

    name = "local corpus"

    def __init__(self, retriever: Retriever, mode: str = "hybrid") -> None:
        self.retriever = retriever
        self.mode = mode

    def search_many(self, queries: list[str], k: int) -> list[list[Hit]]:
        return self.retriever.search_many(queries, k, self.mode)
