"""Sections -> chunks: split on structure first (the document's sections, then paragraphs), then on size.

Each chunk carries a context line (document title and section path) that is embedded and indexed with its
text, so a passage that says "it returns the next line" is still found by a query about files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenmill_research.documents import Document

# About 128 word pieces, the length all-MiniLM-L6-v2 was trained on: a longer passage's embedding blurs the
# several things it says (pydoc listings put many functions in a few hundred characters).
DEFAULT_CHUNK_CHARS = 500
# A chunk shorter than this is joined to the one before it in the same section: a lone heading line or a
# one-line paragraph is not a useful passage on its own.
MIN_CHUNK_CHARS = 120


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    source: str
    title: str
    section: tuple[str, ...]
    text: str

    @property
    def context(self) -> str:
        return " > ".join((self.title,) + tuple(s for s in self.section if s != self.title))

    @property
    def indexed_text(self) -> str:
        """What the dense and lexical indexes see: the context line, then the passage."""
        return f"{self.context}\n{self.text}"

    @property
    def label(self) -> str:
        return f"c{self.chunk_id}"

    def to_json(self) -> dict:
        return {"id": self.chunk_id, "source": self.source, "title": self.title, "section": list(self.section),
                "text": self.text}

    @classmethod
    def from_json(cls, row: dict) -> "Chunk":
        return cls(int(row["id"]), row["source"], row["title"], tuple(row["section"]), row["text"])


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _pieces_within(text: str, limit: int) -> list[str]:
    """A paragraph longer than the limit: split at lines, then sentences, then hard at the limit."""
    if len(text) <= limit:
        return [text]
    for splitter in (lambda t: t.split("\n"), _SENTENCE_END.split):
        parts = [p for p in splitter(text) if p.strip()]
        if len(parts) > 1:
            return [piece for part in parts for piece in _pieces_within(part, limit)]
    return [text[i:i + limit] for i in range(0, len(text), limit)]


def split_section(text: str, limit: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Paragraphs packed greedily up to `limit` characters; short tails joined to the chunk before."""
    pieces = [piece for para in re.split(r"\n\s*\n", text) if para.strip() for piece in _pieces_within(para, limit)]
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > limit:
            chunks.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        if chunks and len(current) < MIN_CHUNK_CHARS and len(chunks[-1]) + len(current) <= limit + MIN_CHUNK_CHARS:
            chunks[-1] = f"{chunks[-1]}\n\n{current}"
        else:
            chunks.append(current)
    return chunks


def chunk_document(document: Document, first_id: int, limit: int = DEFAULT_CHUNK_CHARS) -> list[Chunk]:
    chunks: list[Chunk] = []
    for section in document.sections:
        for text in split_section(section.text, limit):
            chunks.append(Chunk(first_id + len(chunks), document.source, document.title, section.path, text))
    return chunks
