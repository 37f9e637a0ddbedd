"""`tokenmill research eval`: recall@k of gold passages per retrieval mode, citation validity, answer match.

A question file is JSON lines: {"question": str, "gold": [{"source": path in the corpus, "quote": text the
gold passage contains}], "answer": optional reference answer}. A gold passage counts as retrieved when one
of the top k chunks comes from its source and contains its quote (whitespace-normalized), so the set does
not depend on how the corpus happens to be chunked.

With a model, each question's cited answer is written from its top hybrid hits (writer.summarize, as a
report section is), and every citation is checked independently of the writer: the chunk must exist in the
index and be among the hits retrieved for that question. Answer match is the share of the reference
answer's content words found in the written answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill_research.errors import ResearchError
from tokenmill_research.llm_client import LLMClient
from tokenmill_research.retrieval import MODES, Retriever
from tokenmill_research.writer import _content_words, summarize

MAX_QUESTIONS = 1000
EVIDENCE = 3


@dataclass(frozen=True)
class EvalQuestion:
    question: str
    gold: list[tuple[str, str]]  # (source, quote)
    answer: str | None = None


@dataclass
class EvalResults:
    questions: int
    recall: dict[str, float]
    answers_written: int = 0
    citations: int = 0
    valid_citations: int = 0
    answer_match: list[float] = field(default_factory=list)


def _normalized(text: str) -> str:
    return " ".join(text.split()).lower()


def load_questions(path: Path) -> list[EvalQuestion]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ResearchError(f"--questions {path}: {exc.strerror}") from None
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--questions {path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResearchError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ResearchError(f"{where}: 'question' must be a non-empty string")
        gold = row.get("gold")
        if not isinstance(gold, list) or not gold or not all(
                isinstance(g, dict) and isinstance(g.get("source"), str) and isinstance(g.get("quote"), str)
                and g["quote"].strip() for g in gold):
            raise ResearchError(f"{where}: 'gold' must be a non-empty list of {{source, quote}} strings")
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ResearchError(f"{where}: 'answer' must be a string")
        questions.append(EvalQuestion(row["question"], [(g["source"], g["quote"]) for g in gold], answer))
    if not questions:
        raise ResearchError(f"--questions {path}: no questions in it")
    if len(questions) > MAX_QUESTIONS:
        raise ResearchError(f"--questions {path}: {len(questions)} questions; the limit is {MAX_QUESTIONS}")
    return questions


def gold_found(question: EvalQuestion, texts_by_source: list[tuple[str, str]]) -> float:
    """The share of the question's gold passages that one of the (source, text) chunks contains."""
    found = sum(any(src == source and _normalized(quote) in _normalized(text) for src, text in texts_by_source)
                for source, quote in question.gold)
    return found / len(question.gold)


def evaluate(retriever: Retriever, questions: list[EvalQuestion], k: int, client: LLMClient | None) -> EvalResults:
    texts = [q.question for q in questions]
    recall = {}
    hybrid_hits = []
    for mode in MODES:
        hit_lists = retriever.search_many(texts, k, mode)
        if mode == "hybrid":
            hybrid_hits = hit_lists
        recall[mode] = sum(gold_found(q, [(h.chunk.source, h.chunk.text) for h in hits])
                           for q, hits in zip(questions, hit_lists)) / len(questions)
    results = EvalResults(len(questions), recall)
    if client is None:
        return results
    chunks = retriever.store.chunks
    for question, hits in zip(questions, hybrid_hits):
        retrieved = {h.chunk.chunk_id for h in hits}
        sentences = summarize(client, question.question, [h.chunk for h in hits[:EVIDENCE]])
        results.answers_written += 1
        for sentence in sentences:
            for chunk_id in sentence.chunk_ids:
                results.citations += 1
                results.valid_citations += chunk_id in chunks and chunk_id in retrieved
        if question.answer:
            reference = _content_words(question.answer)
            written = _content_words(" ".join(s.text for s in sentences))
            results.answer_match.append(len(reference & written) / max(len(reference), 1))
    return results


def format_results(results: EvalResults, k: int) -> str:
    lines = [f"questions: {results.questions}",
             f"recall@{k}  hybrid {results.recall['hybrid']:.3f}  dense {results.recall['dense']:.3f}  "
             f"bm25 {results.recall['bm25']:.3f}"]
    if results.answers_written and results.citations:
        lines.append(f"citation validity: {results.valid_citations / results.citations:.1%} "
                     f"({results.valid_citations}/{results.citations} citations in {results.answers_written} answers)")
    elif results.answers_written:
        lines.append(f"citation validity: n/a (the {results.answers_written} answers cite nothing)")
    if results.answer_match:
        lines.append(f"answer match: {sum(results.answer_match) / len(results.answer_match):.3f} "
                     f"(share of reference content words, {len(results.answer_match)} answers)")
    return "\n".join(lines)
