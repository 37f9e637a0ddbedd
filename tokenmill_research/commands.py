"""The handlers of `tokenmill research ...` (argparse namespaces in, files and terminal lines out)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenmill_research.errors import ResearchError
from tokenmill_research.session import open_corpus, open_endpoint, say


def _settings(args: argparse.Namespace):
    from tokenmill_research.research_loop import ResearchSettings

    return ResearchSettings(reflections=args.reflections, judge=args.judge)


def cmd_ask(args: argparse.Namespace) -> None:
    from tokenmill_research.progress import TerminalProgress
    from tokenmill_research.research_loop import ResearchRun, check_question
    from tokenmill_research.search_tools import CorpusSearch

    question = check_question(args.question)  # before anything slow is loaded
    settings = _settings(args)
    retriever = open_corpus(args.docs, args.index, args.max_file_mb)
    with open_endpoint(args.base_url, args.model, args.api_key) as client:
        report = ResearchRun(client, CorpusSearch(retriever), settings, TerminalProgress()).run(question)
    markdown = report.to_markdown()
    if args.out:
        Path(args.out).write_text(markdown, encoding="utf-8")
        say(f"wrote {args.out} ({len(report.cited_chunk_ids())} sources cited)")
    else:
        sys.stdout.write(markdown)


def cmd_export(args: argparse.Namespace) -> None:
    from tokenmill_research.python_docs import export_python_docs

    count = export_python_docs(Path(args.out))
    say(f"wrote {count} Markdown files of Python's own documentation to {args.out}")


def cmd_index(args: argparse.Namespace) -> None:
    open_corpus(args.docs, args.index, args.max_file_mb)


def cmd_eval(args: argparse.Namespace) -> None:
    from tokenmill_research.evaluation import evaluate, format_results, load_questions

    if not 1 <= args.k <= 100:
        raise ResearchError(f"--k must be in [1, 100], got {args.k}")
    questions = load_questions(Path(args.questions))
    retriever = open_corpus(args.docs, args.index, args.max_file_mb)
    if args.retrieval_only:
        results = evaluate(retriever, questions, args.k, client=None)
    else:
        with open_endpoint(args.base_url, args.model, args.api_key) as client:
            results = evaluate(retriever, questions, args.k, client=client)
    print(format_results(results, args.k))


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from tokenmill_research.research_loop import ResearchRun
    from tokenmill_research.search_tools import CorpusSearch
    from tokenmill_research.web.app import build_research_app

    settings = _settings(args)
    retriever = open_corpus(args.docs, args.index, args.max_file_mb)
    with open_endpoint(args.base_url, args.model, args.api_key) as client:
        app = build_research_app(lambda on_event: ResearchRun(client, CorpusSearch(retriever), settings, on_event),
                                 retriever.store.chunks)
        say(f"open http://{args.host}:{args.port}/ (Ctrl-C stops)")
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cmd_bench(args: argparse.Namespace) -> None:
    """The same report written twice by fresh local engines: prefix caching + n-gram drafting on, then off.
    The time is the report's (plan to last section); the engine's start is left out of both."""
    import time

    from tokenmill_research.llm_client import LLMClient
    from tokenmill_research.local_server import start_local_server
    from tokenmill_research.research_loop import ResearchRun, check_question
    from tokenmill_research.search_tools import CorpusSearch

    question = check_question(args.question)
    settings = _settings(args)
    retriever = open_corpus(args.docs, args.index, args.max_file_mb)
    seconds = {}
    for fast_paths in (True, False):
        label = "on" if fast_paths else "off"
        server = start_local_server(args.model, fast_paths=fast_paths)
        try:
            start = time.perf_counter()
            report = ResearchRun(LLMClient(server.base_url, server.model_name), CorpusSearch(retriever), settings,
                                 lambda kind, data: None).run(question)
            seconds[label] = time.perf_counter() - start
        finally:
            server.stop()
        say(f"prefix caching + lookup drafting {label}: {seconds[label]:.1f} s "
            f"({len(report.sections)} sections, {len(report.cited_chunk_ids())} sources)")
    print(f"research report end to end: on {seconds['on']:.1f} s, off {seconds['off']:.1f} s, "
          f"speed-up {seconds['off'] / seconds['on']:.2f}x")
