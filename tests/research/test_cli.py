"""`tokenmill research ...` end to end through the command line, against the scripted endpoint."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.cli import main
from tokenmill_research.python_docs import export_python_docs


def test_ask_writes_a_report_file(small_corpus: Path, tmp_path: Path, fake_endpoint, capsys) -> None:
    out = tmp_path / "report.md"
    code = main(["research", "How do I read a file line by line?", "--docs", str(small_corpus),
                 "--index", str(tmp_path / "index"), "--base-url", fake_endpoint.base_url, "--out", str(out)])
    assert code == 0
    report = out.read_text()
    assert report.startswith("# How do I read a file line by line?\n\n## Answer\n")
    assert "## Sources" in report and "1. " in report.split("## Sources")[1]
    err = capsys.readouterr().err
    assert "plan: Answer (How do I read a file line by line?); Reading files" in err
    assert f"wrote {out}" in err
    # the model was named by the endpoint's /v1/models, since --model was not given
    assert {body["model"] for _, body in fake_endpoint.requests} == {"fake"}


def test_bad_input_exits_with_a_message(small_corpus: Path, tmp_path: Path, fake_endpoint, capsys) -> None:
    assert main(["research", "x" * 102400, "--docs", str(small_corpus), "--base-url", fake_endpoint.base_url]) == 2
    assert "error: the question is 102400 characters; the limit is 2000" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["research", "q", "--docs", str(tmp_path / "empty"), "--index", str(tmp_path / "i"),
                 "--base-url", fake_endpoint.base_url]) == 2
    assert "no usable documents" in capsys.readouterr().err
    assert main(["research", "q", "--docs", str(small_corpus), "--max-file-mb", "0"]) == 2
    assert "--max-file-mb must be in (0, 1024], got 0.0" in capsys.readouterr().err
    assert fake_endpoint.requests == []


def test_eval_prints_recall_side_by_side_and_citation_validity(small_corpus: Path, tmp_path: Path, fake_endpoint,
                                                               capsys) -> None:
    questions = tmp_path / "q.jsonl"
    rows = [{"question": "Which statement ends the nearest enclosing loop?",
             "gold": [{"source": "loops.txt", "quote": "The break statement ends the nearest enclosing loop"}],
             "answer": "The break statement."},
            {"question": "What does open return?",
             "gold": [{"source": "sub/open.html", "quote": "returns a file object"}]}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["research", "eval", "--docs", str(small_corpus), "--index", str(tmp_path / "index"),
                 "--questions", str(questions), "--base-url", fake_endpoint.base_url])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "questions: 2"
    assert out[1] == "recall@5  hybrid 1.000  dense 1.000  bm25 1.000"
    assert out[2].startswith("citation validity: 100.0% (") and out[2].endswith(" citations in 2 answers)")
    assert out[3].startswith("answer match: ")


def test_eval_names_the_bad_line_of_a_question_file(small_corpus: Path, tmp_path: Path, capsys) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "q", "gold": [{"source": "a.md", "quote": "x"}]}\n{"question": "q"}\n')
    assert main(["research", "eval", "--docs", str(small_corpus), "--questions", str(questions),
                 "--retrieval-only"]) == 2
    assert f"--questions {questions}, line 2: 'gold' must be a non-empty list" in capsys.readouterr().err


def test_the_python_docs_export_has_the_topics_and_library_pages(tmp_path: Path) -> None:
    count = export_python_docs(tmp_path)
    assert count == len(list(tmp_path.rglob("*.md")))
    with_page = (tmp_path / "topics" / "with.md").read_text()
    assert with_page.startswith('# The "with" statement\n')
    io_page = (tmp_path / "library" / "io.md").read_text()
    assert "## Description" in io_page and "support the iterator protocol" in io_page
    assert " inherited from " not in io_page  # repeated base-class listings are left out


def test_the_shipped_question_set_quotes_the_exported_docs(tmp_path: Path) -> None:
    """Every gold quote exists in the file it names, so recall measures retrieval, not a typo."""
    from tokenmill_research.evaluation import load_questions

    export_python_docs(tmp_path)
    shipped = Path(__file__).resolve().parents[2] / "tokenmill_research" / "data" / "python_docs_questions.jsonl"
    questions = load_questions(shipped)
    assert len(questions) == 30
    for question in questions:
        for source, quote in question.gold:
            text = " ".join((tmp_path / source).read_text().split()).lower()
            assert " ".join(quote.split()).lower() in text, (source, quote)


def test_without_the_package_research_says_what_to_install(monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tokenmill_research", None)  # import fails as if not installed
    assert main(["research", "q", "--docs", "d"]) == 2
    assert ("`tokenmill research` needs the package tokenmill_research, which is not importable here; install it "
            "with pip install 'tokenmill[research]'") in capsys.readouterr().err
