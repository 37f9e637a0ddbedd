"""Reading a folder of documents (Markdown, plain text, HTML, PDF) into titled sections of clean text.

Structure is kept where the format has it (headings; PDF pages), because chunks are split on it first and
each chunk's context line names its section path. Files that cannot be used are skipped with a warning,
never fatal: one broken file must not stop a corpus from being indexed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tokenmill_research.errors import ResearchError

MARKDOWN_SUFFIXES = (".md", ".markdown")
TEXT_SUFFIXES = (".txt", ".rst", ".text")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES = MARKDOWN_SUFFIXES + TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES
DEFAULT_MAX_FILE_BYTES = 20 << 20

Warn = Callable[[str], None]


@dataclass
class Section:
    path: tuple[str, ...]  # headings from the document's top down to this section
    text: str


@dataclass
class Document:
    source: str  # the path relative to the corpus folder, with forward slashes
    title: str
    sections: list[Section] = field(default_factory=list)


def clean_text(text: str) -> str:
    """NFKC, no control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    lines = [line.rstrip() for line in text.replace("\t", "    ").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _sections_from_headings(lines: list[tuple[int, str] | str]) -> list[Section]:
    """Lines, where a (level, title) tuple is a heading, grouped into sections under their heading path."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    body: list[str] = []

    def close() -> None:
        text = clean_text("\n".join(body))
        if text:
            sections.append(Section(tuple(title for _, title in stack), text))
        body.clear()

    for line in lines:
        if isinstance(line, tuple):
            close()
            level, title = line
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, title))
        else:
            body.append(line)
    close()
    return sections


_ATX = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def parse_markdown(text: str) -> list[tuple[int, str] | str]:
    lines: list[tuple[int, str] | str] = []
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _ATX.match(line)
        lines.append((len(heading.group(1)), heading.group(2).strip()) if heading else line)
    return lines


# reST / pydoc-style headings: a line underlined by one repeated punctuation character. The level is the
# order in which underline characters first appear, as reStructuredText defines it.
_UNDERLINE = re.compile(r"^([=\-*~^\"#+])\1{2,}\s*$")


def parse_underlined_text(text: str) -> list[tuple[int, str] | str]:
    raw = text.split("\n")
    levels: dict[str, int] = {}
    lines: list[tuple[int, str] | str] = []
    i = 0
    while i < len(raw):
        line = raw[i]
        nxt = raw[i + 1] if i + 1 < len(raw) else ""
        under = _UNDERLINE.match(nxt)
        if under and line.strip() and not line.startswith(" ") and len(nxt.strip()) >= len(line.strip()) - 2:
            level = levels.setdefault(under.group(1), len(levels) + 1)
            lines.append((level, line.strip()))
            i += 2
            continue
        lines.append(line)
        i += 1
    return lines


class _HTMLSections(HTMLParser):
    """Text of an HTML page with h1-h6 as headings; script, style and navigation left out."""

    SKIPPED = {"script", "style", "nav", "noscript", "template", "svg", "head"}
    BLOCKS = {"p", "div", "li", "br", "tr", "pre", "section", "article", "table", "dt", "dd", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[int, str] | str] = []
        self.title = ""
        self._skip_depth = 0
        self._heading: int | None = None
        self._in_title = False
        self._buffer: list[str] = []

    def _flush(self) -> None:
        text = "".join(self._buffer)
        self._buffer.clear()
        if self._heading is not None:
            title = " ".join(text.split())
            if title:
                self.lines.append((self._heading, title))
        elif text.strip():
            self.lines.append(" ".join(text.split()))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIPPED:
            self._skip_depth += 1
        elif tag == "title":
            self._in_title = True
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self._heading = int(tag[1])
        elif tag in self.BLOCKS:
            self._flush()
            self.lines.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIPPED:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "title":
            self._in_title = False
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self._heading = None
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip_depth:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise ResearchError(f"{path}: looks binary (NUL bytes), not text")
    return data.decode("utf-8", errors="replace")


def _first_heading(lines: list[tuple[int, str] | str]) -> str | None:
    return next((line[1] for line in lines if isinstance(line, tuple)), None)


def read_document(path: Path, source: str) -> Document:
    """One file as a Document; raises ResearchError (or OSError) when it cannot be read."""
    suffix = path.suffix.lower()
    stem_title = path.stem.replace("_", " ").replace("-", " ")
    if suffix in PDF_SUFFIXES:
        return _read_pdf(path, source, stem_title)
    if suffix in HTML_SUFFIXES:
        parser = _HTMLSections()
        parser.feed(_read_text(path))
        parser.close()
        title = " ".join(parser.title.split()) or _first_heading(parser.lines) or stem_title
        return Document(source, title, _sections_from_headings(parser.lines))
    text = clean_text(_read_text(path))
    lines = parse_markdown(text) if suffix in MARKDOWN_SUFFIXES else parse_underlined_text(text)
    return Document(source, _first_heading(lines) or stem_title, _sections_from_headings(lines))


def _read_pdf(path: Path, source: str, stem_title: str) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or stem_title
    except (PdfReadError, ValueError, KeyError) as exc:  # pypdf's errors for a damaged file
        raise ResearchError(f"{path}: not a readable PDF ({exc})") from exc
    sections = [Section((f"page {n}",), clean_text(text)) for n, text in enumerate(pages, 1) if clean_text(text)]
    return Document(source, str(title), sections)


def corpus_files(folder: Path, warn: Warn, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[tuple[Path, str]]:
    """(path, source name) of every supported file under folder, sorted; too-large files are skipped with a
    warning. Hidden files and folders (the index lives in one) are not documents."""
    if not folder.is_dir():
        raise ResearchError(f"--docs {folder}: not a folder")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            continue
        size = path.stat().st_size
        if size > max_file_bytes:
            warn(f"skipped {rel}: {size} bytes is over the {max_file_bytes}-byte limit per file (--max-file-mb)")
            continue
        yield path, rel.as_posix()
