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


def attribute(reply: str, evidence: list[Chunk]) -> list[CitedSentence]:
    """The reply's sentences, each with the chunk ids it cites (see the module's docstring)."""
    words = [_content_words(c.indexed_text) for c in evidence]
    sentences = []
    for raw in _complete_sentences(reply):
        markers = [int(m) for m in _MARKER.findall(raw)]
        text = " ".join(_MARKER_WITH_SPACE.sub("", raw).split())
        if not text:
            continue
        cited = list(dict.fromkeys(evidence[m - 1].chunk_id for m in markers if 1 <= m <= len(evidence)))
        if not cited and evidence:
            mine = _content_words(text)
            shared = [len(mine & w) for w in words]
            best = max(range(len(evidence)), key=lambda i: shared[i])
            if shared[best] >= MIN_SHARED_WORDS:
                cited = [evidence[best].chunk_id]
        sentences.append(CitedSentence(text, cited))
    return sentences


def summarize(client: LLMClient, question: str, evidence: list[Chunk]) -> list[CitedSentence]:
    """A few cited sentences answering the question from the evidence (no evidence: no model call)."""
    if not evidence:
        return []
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Passages:\n{evidence_block(evidence)}\n\nQuestion: {question}"}]
    return attribute(client.chat(messages, SUMMARY_MAX_TOKENS), evidence)
