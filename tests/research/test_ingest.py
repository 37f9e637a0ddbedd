"""Reading, cleaning and chunking documents; the on-disk index: re-opened, updated incrementally, bad files
skipped with a warning, an empty folder refused with a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.research.conftest import write_small_corpus
from tests.research.pdf_file import write_pdf
from tokenmill_research.chunking import MIN_CHUNK_CHARS, chunk_document, split_section
from tokenmill_research.documents import Document, Section, clean_text, read_document
from tokenmill_research.errors import ResearchError


def test_markdown_sections_follow_the_heading_path_and_ignore_headings_in_code(tmp_path: Path) -> None:
    path = tmp_path / "a.md"
    path.write_text("# Title\n\nIntro.\n\n## Part\n\n```\n# not a heading\n```\n\n### Deep\n\nDeep text.\n\n## Next\n\nNext text.\n")
    doc = read_document(path, "a.md")
    assert doc.title == "Title"
    assert [(s.path, s.text) for s in doc.sections] == [
        (("Title",), "Intro."), (("Title", "Part"), "```\n# not a heading\n```"),
        (("Title", "Part", "Deep"), "Deep text."), (("Title", "Next"), "Next text.")]


def test_html_keeps_headings_and_drops_script_style_and_navigation(tmp_path: Path) -> None:
    folder = write_small_corpus(tmp_path / "docs")
    doc = read_document(folder / "sub" / "open.html", "sub/open.html")
    assert doc.title == "The open function"
    assert [s.path for s in doc.sections] == [("open()",), ("open()", "Encoding")]
    text = " ".join(s.text for s in doc.sections)
    assert "opens a file and returns a file object" in text
    assert "var x" not in text and "color" not in text and "Home" not in text


def test_underlined_text_headings_take_levels_in_order_of_appearance(tmp_path: Path) -> None:
    folder = write_small_corpus(tmp_path / "docs")
    doc = read_document(folder / "loops.txt", "loops.txt")
    assert [s.path for s in doc.sections] == [("Loops",), ("Loops", "Breaking out")]


def test_pdf_text_comes_out_per_page_with_the_documents_title(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "guide.pdf", "Guide to files", "Use readline to read one line.")
    doc = read_document(path, "guide.pdf")
    assert doc.title == "Guide to files"
    assert [(s.path, s.text) for s in doc.sections] == [(("page 1",), "Use readline to read one line.")]


def test_a_damaged_pdf_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\nthis is not a pdf body")
    with pytest.raises(ResearchError, match="broken.pdf: not a readable PDF"):
        read_document(path, "broken.pdf")


def test_clean_text_normalizes_and_removes_control_characters() -> None:
    assert clean_text("ﬁle\x07 name  \r\n\r\n\r\n\r\nnext\t") == "file name\n\nnext"


def test_chunks_split_on_paragraphs_then_size_and_carry_a_context_line() -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 40 for i in range(6)]
    pieces = split_section("\n\n".join(paragraphs), limit=500)
    assert all(len(p) <= 500 for p in pieces)
    assert "\n\n".join(pieces).replace("\n\n", " ").split() == " ".join(paragraphs).split()
    assert all(p.startswith("Paragraph") for p in pieces)  # no paragraph was cut while others fit
    huge = "x" * 1200
    assert split_section(huge, limit=500) == ["x" * 500, "x" * 500, "x" * 200]
    doc = Document("d.md", "Doc", [Section(("Doc", "Part"), "Short text. " * 5)])
    [chunk] = chunk_document(doc, first_id=7)
    assert (chunk.chunk_id, chunk.label, chunk.context) == (7, "c7", "Doc > Part")
    assert chunk.indexed_text.startswith("Doc > Part\n")


def test_a_short_tail_joins_the_chunk_before_it() -> None:
    pieces = split_section("a" * 400 + "\n\n" + "b" * 50, limit=420)
    assert pieces == ["a" * 400 + "\n\n" + "b" * 50]
    assert 50 < MIN_CHUNK_CHARS


def test_index_reopens_and_updates_only_changed_files(tmp_path: Path) -> None:
    from tokenmill_research.corpus_store import CorpusStore
    from tokenmill_research.embedder import shared_embedder

    folder = write_small_corpus(tmp_path / "docs")
    warnings: list[str] = []
    store = CorpusStore(tmp_path / "index", shared_embedder())
    first = store.update(folder, warnings.append)
    assert (first.added_files, first.unchanged_files, warnings) == (3, 0, [])
    ids_before = {c.chunk_id: c.text for c in store.chunks.values()}

    reopened = CorpusStore(tmp_path / "index", shared_embedder())
    assert {c.chunk_id: c.text for c in reopened.chunks.values()} == ids_before
    assert reopened.vectors.ntotal == len(ids_before)

    (folder / "loops.txt").unlink()
    (folder / "files.md").write_text("# Reading files\n\nThe readlines method returns a list of all lines.\n")
    second = reopened.update(folder, warnings.append)
    assert (second.added_files, second.removed_files, second.unchanged_files) == (1, 1, 1)
    sources = {c.source for c in reopened.chunks.values()}
    assert sources == {"files.md", "sub/open.html"}
    assert reopened.vectors.ntotal == len(reopened.chunks)
    assert any("readlines method" in c.text for c in reopened.chunks.values())
    assert not any("iterator over its lines" in c.text for c in reopened.chunks.values())
    # the search finds the new text by its own vector, not a stale one
    vector = shared_embedder().encode(["The readlines method returns a list of all lines."])
    top = reopened.dense_search(vector, 1)[0][0]
    assert "readlines method" in reopened.chunks[top].text


def test_bad_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    from tokenmill_research.corpus_store import CorpusStore
    from tokenmill_research.embedder import shared_embedder

    folder = write_small_corpus(tmp_path / "docs")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02 binary")
    (folder / "huge.md").write_text("# Huge\n\n" + "x" * 3000)
    (folder / "empty.md").write_text("   \n")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    unreadable = folder / "secret.md"
    unreadable.write_text("# Secret\n\ntext")
    unreadable.chmod(0)
    warnings: list[str] = []
    summary = CorpusStore(tmp_path / "index", shared_embedder()).update(folder, warnings.append, max_file_bytes=2000)
    assert summary.added_files == (4 if os.geteuid() == 0 else 3)  # root reads a file whatever its mode
    text = "\n".join(warnings)
    assert "skipped huge.md: " in text and "over the 2000-byte limit per file" in text
    assert "skipped binary.txt: " in text and "looks binary" in text
    assert "skipped empty.md: no text in it" in text
    assert "skipped broken.pdf: " in text and "not a readable PDF" in text
    if os.geteuid() != 0:
        assert "skipped secret.md: " in text


def test_an_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    from tokenmill_research.corpus_store import CorpusStore
    from tokenmill_research.embedder import shared_embedder

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.docx").write_bytes(b"unsupported")
    store = CorpusStore(tmp_path / "index", shared_embedder())
    with pytest.raises(ResearchError, match=r"--docs .*empty: no usable documents \(supported: .md"):
        store.update(tmp_path / "empty", print)
    with pytest.raises(ResearchError, match=r"--docs .*missing: not a folder"):
        store.update(tmp_path / "missing", print)
