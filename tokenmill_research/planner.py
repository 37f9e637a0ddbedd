"""The research plan: a short outline, one search query per section, produced as JSON-schema-constrained
output so that a small model's plan always parses (lengths bounded, no free-form keys)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill_research.errors import ReplyFormatError
from tokenmill_research.llm_client import LLMClient

MAX_SECTIONS = 3
PLAN_SCHEMA = {
    "type": "object",
    "properties": {
        "sections": {
            "type": "array", "minItems": 1, "maxItems": MAX_SECTIONS,
            "items": {
                "type": "object",
                "properties": {"title": {"type": "string", "minLength": 3, "maxLength": 40},
                               "query": {"type": "string", "minLength": 3, "maxLength": 60}},
                "required": ["title", "query"], "additionalProperties": False,
            },
        },
    },
    "required": ["sections"], "additionalProperties": False,
}
FOLLOW_UP_SCHEMA = {
    "type": "object",
    "properties": {"queries": {"type": "array", "minItems": 1, "maxItems": 2,
                               "items": {"type": "string", "minLength": 3, "maxLength": 60}}},
    "required": ["queries"], "additionalProperties": False,
}
# Room for the longest reply the schema allows (3 x (40 + 60) characters of text plus the JSON around it),
# so the grammar, not the token limit, ends it: a reply cut short is not JSON.
PLAN_MAX_TOKENS = 200
FOLLOW_UP_MAX_TOKENS = 80


@dataclass(frozen=True)
class PlannedSection:
    title: str
    query: str


def _clean(text: str) -> str:
    return " ".join(text.split())


def make_plan(client: LLMClient, question: str) -> tuple[list[PlannedSection], str | None]:
    """(sections, note): the model's outline; when the endpoint's reply does not parse (an endpoint that
    ignores response_format), one section asking the question itself, and a note saying so."""
    messages = [
        {"role": "system", "content": "You plan short research reports. Reply with JSON only."},
        {"role": "user", "content": f"Question: {question}\n\nList up to {MAX_SECTIONS} report sections. For each, "
                                    "give a title and one search query for documentation."},
    ]
    try:
        reply = client.chat_json(messages, PLAN_SCHEMA, PLAN_MAX_TOKENS)
        sections = [PlannedSection(_clean(s["title"]), _clean(s["query"])) for s in reply["sections"]]
    except (ReplyFormatError, KeyError, TypeError) as exc:
        return [PlannedSection("Answer", question)], f"plan not usable ({exc}); searching the question itself"
    sections = [s for s in sections if s.title and s.query][:MAX_SECTIONS]
    if not sections:
        return [PlannedSection("Answer", question)], "the plan had no usable sections; searching the question itself"
    return sections, None


def follow_up_queries(client: LLMClient, question: str, findings: str) -> list[str]:
    """Reflection: one or two queries for what the findings so far leave open."""
    messages = [
        {"role": "system", "content": "You review research notes and find gaps. Reply with JSON only."},
        {"role": "user", "content": f"Question: {question}\n\nNotes so far:\n{findings[:1500]}\n\n"
                                    "Give one or two new search queries for what the notes do not answer yet."},
    ]
    reply = client.chat_json(messages, FOLLOW_UP_SCHEMA, FOLLOW_UP_MAX_TOKENS)
    return [q for q in (_clean(q) for q in reply.get("queries", []) if isinstance(q, str)) if q]
