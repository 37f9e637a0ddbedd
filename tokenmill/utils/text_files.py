"""Text files as documents: gather them from files and folders, read UTF-8, drop binaries and duplicates.

Standard library only. `tokenmill bench --prompt-files` cuts prompts from these documents, and the training
package builds its corpus from them, so both see the same files in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Folders no one wants in a corpus: VCS metadata, caches, vendored environments.
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "venv"}
_BINARY_PROBE = 8192


@dataclass(frozen=True)
class Document:
    path: str
    text: str
    sha256: str


@dataclass
class Corpus:
    documents: list[Document]
    skipped: list[tuple[str, str]]  # (path, reason)
    duplicates: int

    def fingerprint(self) -> str:
        """Identifies the document set, so a resumed run can refuse a changed corpus."""
        h = hashlib.sha256()
        for doc in sorted(d.sha256 for d in self.documents):
            h.update(doc.encode())
        return h.hexdigest()


def _normalize_exts(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e if e.startswith(".") else f".{e}" for e in extensions)


def gather_files(paths: Sequence[str | Path], extensions: Iterable[str] = (".py",),
                 option: str = "--data") -> list[Path]:
    """Files named directly, plus files under folders whose name ends with one of `extensions`.

    Hidden folders (.git, .venv, ...) and cache folders are skipped. The order is sorted so the
    corpus, and hence the held-out split, does not depend on the file system's listing order.
    `option` names the command-line flag the paths came from, for the error about a missing path.
    """
    exts = _normalize_exts(extensions)
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            for f in path.rglob("*"):
                rel = f.relative_to(path).parts[:-1]
                if any(p.startswith(".") or p in _SKIP_DIRS for p in rel):
                    continue
                if f.is_file() and f.name.endswith(exts):
                    found.add(f)
        else:
            raise FileNotFoundError(f"{option}: {path} is neither a file nor a folder")
    return sorted(found)


def read_corpus(files: Sequence[Path]) -> Corpus:
    """Read UTF-8 text files; skip unreadable, binary, undecodable and empty ones; drop exact duplicates."""
    docs: list[Document] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    duplicates = 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            skipped.append((str(f), f"unreadable: {e.strerror or e}"))
            continue
        if b"\0" in data[:_BINARY_PROBE]:
            skipped.append((str(f), "binary"))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append((str(f), "not UTF-8"))
            continue
        if not text.strip():
            skipped.append((str(f), "empty"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        docs.append(Document(str(f), text, digest))
    return Corpus(docs, skipped, duplicates)
