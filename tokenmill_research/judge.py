"""The LLM as relevance judge: candidates re-ranked by the model's probability of answering "yes" to
"does this passage help answer the question?", all candidates of all queries scored in one batched call.

The prompts start with the instruction and the question and end with the passage, so the prompts of one
query share a prefix the server's prefix cache reuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill_research.llm_client import LLMClient
from tokenmill_research.retrieval import Hit

PASSAGE_CHARS = 600
UNDECIDED = 0.5  # neither "yes" nor "no" among the top logprobs: the judge has no opinion


@dataclass(frozen=True)
class JudgedHit:
    hit: Hit
    relevance: float  # the judge's P(yes); UNDECIDED when it gave neither answer


def judge_prompt(query: str, hit: Hit) -> str:
    return ("Decide whether a documentation passage helps answer a question.\n"
            f"Question: {query}\n\n"
            f"Passage ({hit.chunk.context}):\n{hit.chunk.text[:PASSAGE_CHARS]}\n\n"
            "Does this passage help answer the question? Answer yes or no.\nAnswer:")


def judge_hits(client: LLMClient, queries: Sequence[str], hit_lists: Sequence[Sequence[Hit]]) -> list[list[JudgedHit]]:
    """Each query's hits re-ranked by relevance (ties keep the fused order); one completions call in all."""
    prompts = [judge_prompt(q, h) for q, hits in zip(queries, hit_lists) for h in hits]
    scores = iter(client.yes_probabilities(prompts))
    judged = []
    for hits in hit_lists:
        rows = [JudgedHit(h, s if s is not None else UNDECIDED) for h, s in zip(hits, scores)]
        # sorted() is stable: equal relevance keeps the retriever's order
        judged.append(sorted(rows, key=lambda r: -r.relevance))
    return judged
