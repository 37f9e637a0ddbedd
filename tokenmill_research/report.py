"""The report: sections of cited sentences -> Markdown with numbered citations and a sources list.

Citation numbers are given in order of first use; every number maps to a chunk the loop retrieved (the
Report refuses a sentence citing a chunk outside its `retrieved` set, so an invalid citation cannot be
written, only raised about).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill_research.chunking import Chunk
from tokenmill_research.writer import CitedSentence


@dataclass
class ReportSection:
    title: str
    query: str
    sentences: list[CitedSentence]


@dataclass
class Report:
    question: str
    sections: list[ReportSection] = field(default_factory=list)
    retrieved: dict[int, Chunk] = field(default_factory=dict)  # every chunk any query retrieved
    notes: list[str] = field(default_factory=list)

    def add_section(self, section: ReportSection) -> None:
        for sentence in section.sentences:
            unknown = [c for c in sentence.chunk_ids if c not in self.retrieved]
            if unknown:
                raise ValueError(f"a sentence cites chunk(s) {unknown} that were not retrieved")
        self.sections.append(section)

    def citation_numbers(self) -> dict[int, int]:
        numbers: dict[int, int] = {}
        for section in self.sections:
            for sentence in section.sentences:
                for chunk_id in sentence.chunk_ids:
                    numbers.setdefault(chunk_id, len(numbers) + 1)
        return numbers

    def cited_chunk_ids(self) -> list[int]:
        return list(self.citation_numbers())

    def to_markdown(self) -> str:
        numbers = self.citation_numbers()
        lines = [f"# {self.question}", ""]
        for section in self.sections:
            lines += [f"## {section.title}", ""]
            if not section.sentences:
                lines += ["_No relevant passage was found for this section._", ""]
                continue
            text = " ".join(s.text + "".join(f" [{numbers[c]}]" for c in s.chunk_ids) for s in section.sentences)
            lines += [text, ""]
        lines += ["## Sources", ""]
        for chunk_id, number in numbers.items():
            chunk = self.retrieved[chunk_id]
            lines.append(f"{number}. {chunk.context} ({chunk.source}, chunk {chunk.label})")
        if not numbers:
            lines.append("_No passage was cited._")
        return "\n".join(lines).rstrip() + "\n"

    def to_json(self) -> dict:
        numbers = self.citation_numbers()
        return {
            "question": self.question,
            "sections": [{"title": s.title, "query": s.query,
                          "sentences": [{"text": x.text, "citations": [numbers[c] for c in x.chunk_ids]}
                                        for x in s.sentences]} for s in self.sections],
            "sources": [{"number": n, "chunk_id": c, "label": self.retrieved[c].label,
                         "context": self.retrieved[c].context, "source": self.retrieved[c].source}
                        for c, n in numbers.items()],
            "notes": self.notes,
        }
