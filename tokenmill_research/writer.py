"""Section summaries with citations that are valid by construction.

The model is shown numbered passages and asked for a few sentences. Its text is split into sentences and
each sentence is cited by code: a marker like [2] the model wrote is kept only when it names a passage it
was shown; a sentence without such a marker is attributed to the shown passage it shares the most content
words with (at least MIN_SHARED_WORDS), or left uncited. A citation therefore always names a chunk that
was retrieved for this section; nothing in the model's free text can invent one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tokenmill_research.chunking import Chunk
from tokenmill_research.llm_client import LLMClient

SUMMARY_MAX_TOKENS = 96
EVIDENCE_CHARS = 500
MIN_SHARED_WORDS = 2
SYSTEM_PROMPT = ("You are a research assistant. Answer only from the numbered documentation passages. "
                 "Write two or three short sentences. Cite passages like [1].")
_MARKER = re.compile(r"\[(\d{1,3})\]")
_MARKER_WITH_SPACE = re.compile(r"\s*\[\d{1,3}\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z_][a-z0-9_]{2,}")
_STOPWORDS = frozenset(
    "the and for are but not you all any can had her was one our out has have this that with from they will "
    "what when which there their then them these those into than its also been more some such only other "
    "does how use used using each may".split())


@dataclass
class CitedSentence:
    text: str
    chunk_ids: list[int] = field(default_factory=list)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def evidence_block(evidence: list[Chunk]) -> str:
    return "\n\n".join(f"[{n}] ({c.context}) {c.text[:EVIDENCE_CHARS]}" for n, c in enumerate(evidence, 1))


def _complete_sentences(reply: str) -> list[str]:
    """The reply's sentences without a last one cut off by the token limit, and without repeats (a small
    model loops)."""
    parts = [p for p in _SENTENCE.split(reply.strip()) if p.strip()]
    if len(parts) > 1 and not re.search(r"[.!?`)\]]\s*$", parts[-1]):
        parts.pop()
    return list(dict.fromkeys(parts))


def attribute(reply: str, evidence: list[Chunk], focus: list[int] | None = None) -> list[CitedSentence]:
    """The reply's sentences, each with the chunk ids it cites (see the module's docstring). focus: the
    0-based positions of the passages this question is about; word-overlap attribution picks among them."""
    focus = list(range(len(evidence))) if focus is None else focus
    words = {i: _content_words(evidence[i].indexed_text) for i in focus}
    sentences = []
    for raw in _complete_sentences(reply):
        markers = [int(m) for m in _MARKER.findall(raw)]
        text = " ".join(_MARKER_WITH_SPACE.sub("", raw).split())
        if not text:
            continue
        cited = list(dict.fromkeys(evidence[m - 1].chunk_id for m in markers if 1 <= m <= len(evidence)))
        if not cited and words:
            mine = _content_words(text)
            best = max(focus, key=lambda i: len(mine & words[i]))
            if len(mine & words[best]) >= MIN_SHARED_WORDS:
                cited = [evidence[best].chunk_id]
        sentences.append(CitedSentence(text, cited))
    return sentences


def summarize(client: LLMClient, question: str, evidence: list[Chunk], focus: list[int] | None = None) -> list[CitedSentence]:
    """A few cited sentences answering the question from the evidence (no evidence: no model call).

    evidence may be the run's whole EvidencePack, the same numbered block in every section's prompt so the
    server's prefix cache computes it once; focus then names this question's own passages."""
    if not evidence or focus == []:
        return []
    hint = "" if focus is None else "\nMost relevant: " + ", ".join(f"[{i + 1}]" for i in focus) + "."
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Passages:\n{evidence_block(evidence)}\n\nQuestion: {question}{hint}"}]
    return attribute(client.chat(messages, SUMMARY_MAX_TOKENS), evidence, focus)


class EvidencePack:
    """The passages of a run, numbered in the order they were first used and only ever appended to: every
    section's prompt starts with the same block, and a later round's block extends the earlier one, so the
    prompts share a long cached prefix."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self._position: dict[int, int] = {}

    def add(self, chunks: list[Chunk]) -> list[int]:
        """The 0-based positions of these chunks, appending the new ones."""
        for chunk in chunks:
            if chunk.chunk_id not in self._position:
                self._position[chunk.chunk_id] = len(self.chunks)
                self.chunks.append(chunk)
        return [self._position[c.chunk_id] for c in chunks]
