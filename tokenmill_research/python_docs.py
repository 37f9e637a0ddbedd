"""`tokenmill research export-python-docs DIR`: documentation that ships with every Python, as a corpus.

Two sources, both in the standard library, so the example corpus needs no download: the language
reference topics of `pydoc_data.topics` (what `help("with")` shows) and pydoc's text rendering of a set of
commonly used modules and built-ins (what `help(io)` shows). Each becomes one Markdown file whose headings
come from the text's own structure.
"""

from __future__ import annotations

import importlib
import pydoc
import re
from pathlib import Path

from tokenmill_research.documents import parse_underlined_text

# Modules whose documentation answers everyday "how do I" questions; each renders to tens of KB at most.
MODULES = ("io", "pathlib", "os.path", "json", "csv", "re", "itertools", "functools", "collections",
           "datetime", "shutil", "glob", "tempfile", "string", "textwrap", "random", "math", "statistics",
           "subprocess", "argparse", "logging", "contextlib", "dataclasses", "enum", "copy", "heapq", "bisect",
           "time", "urllib.parse", "sqlite3", "zipfile", "hashlib", "fileinput", "linecache", "pickle")
BUILTINS = ("open", "print", "input", "len", "range", "enumerate", "zip", "sorted", "map", "filter",
            "str", "list", "dict", "set", "tuple", "int", "float")
_PYDOC_SECTION = re.compile(r"^[A-Z][A-Z ]+$")  # NAME, DESCRIPTION, CLASSES, FUNCTIONS, DATA, ...


def topics_markdown() -> dict[str, str]:
    """File name -> Markdown for each pydoc_data topic (reST-style underlined headings become #, ##, ...)."""
    from pydoc_data.topics import topics

    files = {}
    for name, text in sorted(topics.items()):
        lines = []
        for line in parse_underlined_text(text):
            lines.append(f"{'#' * line[0]} {line[1]}" if isinstance(line, tuple) else line)
        body = "\n".join(lines).strip()
        if not body.startswith("#"):
            body = f"# {name}\n\n{body}"
        files[f"topics/{name}.md"] = body + "\n"
    return files


_INHERITED = re.compile(r"^\s*\|\s+\S.* inherited from ")
_CLASS_RULE = re.compile(r"^\s*\|\s+-{20,}\s*$")
# A class or function entry of a module page: indented exactly four spaces, as pydoc writes them.
_ENTRY = re.compile(r"^    (?:(class \w+)|(\w+)\()")
_CLASS_BAR = re.compile(r"^(\s*)\|\s?")  # the bar pydoc draws down a class body
_SKIPPED_SECTIONS = ("DATA", "FILE", "VERSION", "AUTHOR", "CREDITS", "MODULE REFERENCE")


def _pydoc_markdown(title: str, text: str) -> str:
    """pydoc's text as Markdown: its upper-case section names become ## headings and each class or function
    entry a ### heading under them (so chunks split at entries and name them in their context line); what a
    class inherits (the same text repeated under every subclass) and the constants and file-path sections
    are left out."""
    lines = [f"# {title}", ""]
    skipping_inherited = skipping_section = False
    for line in pydoc.plain(text).split("\n"):
        if _PYDOC_SECTION.match(line):
            skipping_section = line.strip() in _SKIPPED_SECTIONS
            skipping_inherited = False
            if not skipping_section:
                lines.append(f"## {line.strip().title()}")
            continue
        if _INHERITED.match(line):
            skipping_inherited = True
        elif _CLASS_RULE.match(line) or not line.lstrip().startswith("|"):
            skipping_inherited = False
        if skipping_inherited or skipping_section:
            continue
        entry = _ENTRY.match(line)
        if entry:
            lines.append(f"### {entry.group(1) or entry.group(2) + '()'}")
        lines.append(_CLASS_BAR.sub("", line))
    return "\n".join(lines).strip() + "\n"


def library_markdown() -> dict[str, str]:
    files = {}
    for name in MODULES:
        module = importlib.import_module(name)
        files[f"library/{name}.md"] = _pydoc_markdown(f"{name} module", pydoc.render_doc(module, renderer=pydoc.plaintext))
    import builtins

    for name in BUILTINS:
        text = pydoc.render_doc(getattr(builtins, name), renderer=pydoc.plaintext)
        files[f"builtins/{name}.md"] = _pydoc_markdown(f"built-in {name}", text)
    return files


def export_python_docs(out: Path) -> int:
    """Write the corpus under out; returns the number of files written."""
    files = {**topics_markdown(), **library_markdown()}
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return len(files)
