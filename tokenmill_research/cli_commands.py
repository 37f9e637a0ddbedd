"""`tokenmill research ...`: the argparse wiring. Only argparse is imported at module level, so
`tokenmill --help` pays nothing for the embedding model, FAISS or the engine.

`tokenmill research QUESTION --docs DIR` asks; the words serve, eval, index, bench and export-python-docs
as the first argument name the other commands instead.
"""

from __future__ import annotations

import argparse
from typing import Any

SUBCOMMANDS = ("serve", "eval", "index", "bench", "export-python-docs")


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--docs", required=True, metavar="DIR", help="folder of .md, .txt, .rst, .html, .pdf documents")
    p.add_argument("--index", default=None, metavar="DIR",
                   help="where the index lives (default: ~/.cache/tokenmill/research/<folder>-<hash>)")
    p.add_argument("--max-file-mb", type=float, default=20.0, help="larger files are skipped with a warning")


def _endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: start a local "
                   "tokenmill engine)")
    p.add_argument("--model", default=None, help="model name (with --base-url) or tokenmill model name/path")
    p.add_argument("--api-key", default="none", help="the endpoint's API key")


def _loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reflections", type=int, default=1, help="rounds of finding gaps and searching again")
    p.add_argument("--no-judge", dest="judge", action="store_false", help="skip the LLM relevance re-rank")


def build_research_parser(command: str | None) -> argparse.ArgumentParser:
    if command is None:
        p = argparse.ArgumentParser(prog="tokenmill research",
                                    description="research a question in a folder of documents and write a cited "
                                    f"report (other commands: {', '.join(SUBCOMMANDS)})")
        p.add_argument("question")
        _corpus_args(p)
        _endpoint_args(p)
        _loop_args(p)
        p.add_argument("--out", default=None, metavar="FILE", help="write the Markdown report here (default: stdout)")
        return p
    p = argparse.ArgumentParser(prog=f"tokenmill research {command}")
    if command == "export-python-docs":
        p.description = "write documentation that ships with Python (pydoc topics, module docs) as Markdown"
        p.add_argument("out", metavar="DIR")
    elif command == "index":
        p.description = "index (or update the index of) a folder of documents"
        _corpus_args(p)
    elif command == "eval":
        p.description = "retrieval recall@k (hybrid, dense, BM25), citation validity and answer match"
        _corpus_args(p)
        _endpoint_args(p)
        p.add_argument("--questions", required=True, metavar="FILE.jsonl",
                       help="JSON lines: question, gold [{source, quote}], optional answer")
        p.add_argument("--k", type=int, default=5)
        p.add_argument("--retrieval-only", action="store_true", help="no model: recall only")
    elif command == "serve":
        p.description = "a web page: ask, watch progress, read the report and open its citations"
        _corpus_args(p)
        _endpoint_args(p)
        _loop_args(p)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8100)
    elif command == "bench":
        p.description = "one report's end-to-end time with prefix caching + prompt-lookup drafting on and off"
        p.add_argument("question")
        _corpus_args(p)
        p.add_argument("--model", default=None)
        _loop_args(p)
    return p


def run_research_command(argv: list[str]) -> None:
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_research_parser(command).parse_args(argv[1:] if command else argv)
    from tokenmill_research import commands

    handler = {None: commands.cmd_ask, "export-python-docs": commands.cmd_export, "index": commands.cmd_index,
               "eval": commands.cmd_eval, "serve": commands.cmd_serve, "bench": commands.cmd_bench}[command]
    handler(args)


def add_research_parser(subparsers: Any) -> None:
    """`tokenmill research`: every argument is passed on to this package's own parser (its question is
    positional and it has subcommands, which one argparse level cannot express together)."""
    p = subparsers.add_parser("research", help="plan, retrieve, reflect and write a cited report over a folder of "
                              "documents (`tokenmill research --help`)", prefix_chars="\0", add_help=False)
    p.add_argument("research_args", nargs="*")
    p.set_defaults(func=lambda args: run_research_command(args.research_args))
