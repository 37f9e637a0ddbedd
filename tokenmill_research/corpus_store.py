"""The on-disk corpus index: chunks (JSON lines), their vectors (a FAISS index keyed by chunk id) and a
manifest of which file produced which chunks.

`CorpusStore.update(folder)` re-reads only files whose size, mtime or content hash changed, removes the
chunks of changed and deleted files from the vector index by id and adds the new ones, so re-opening a
large corpus after editing one file embeds one file. Every file is written to a temporary name and renamed,
so an interrupted update leaves the previous index readable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill_research.chunking import DEFAULT_CHUNK_CHARS, Chunk, chunk_document
from tokenmill_research.documents import DEFAULT_MAX_FILE_BYTES, corpus_files, read_document
from tokenmill_research.embedder import EMBEDDER_NAME, Embedder
from tokenmill_research.errors import ResearchError

FORMAT_VERSION = 1
MANIFEST, CHUNKS, VECTORS = "manifest.json", "chunks.jsonl", "vectors.faiss"


def default_index_dir(docs: Path) -> Path:
    """Beside the user's other caches, one folder per corpus path: the docs folder may be read-only."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(docs.resolve()).encode()).hexdigest()[:16]
    return cache / "tokenmill" / "research" / f"{docs.resolve().name}-{key}"


@dataclass
class UpdateSummary:
    added_files: int = 0
    removed_files: int = 0
    unchanged_files: int = 0
    skipped_files: int = 0
    chunks: int = 0


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CorpusStore:
    def __init__(self, index_dir: Path, embedder: Embedder) -> None:
        import faiss

        self.dir = index_dir
        self.embedder = embedder
        self.files: dict[str, dict] = {}
        self.chunks: dict[int, Chunk] = {}
        self.next_id = 0
        self.chunk_chars = DEFAULT_CHUNK_CHARS
        self.vectors = faiss.IndexIDMap2(faiss.IndexFlatIP(embedder.dimension))
        if (index_dir / MANIFEST).is_file():
            self._load()

    def _load(self) -> None:
        import faiss

        manifest = json.loads((self.dir / MANIFEST).read_text())
        if (manifest.get("version"), manifest.get("embedder"), manifest.get("chunk_chars")) != (
                FORMAT_VERSION, EMBEDDER_NAME, self.chunk_chars):
            return  # another format, encoder or chunk size: start over rather than mix them
        self.files, self.next_id = manifest["files"], manifest["next_id"]
        with open(self.dir / CHUNKS, encoding="utf-8") as f:
            self.chunks = {c.chunk_id: c for c in (Chunk.from_json(json.loads(line)) for line in f if line.strip())}
        self.vectors = faiss.read_index(str(self.dir / VECTORS))
        if self.vectors.ntotal != len(self.chunks):
            raise ResearchError(f"the index in {self.dir} is inconsistent ({self.vectors.ntotal} vectors, "
                                f"{len(self.chunks)} chunks); delete the folder to rebuild it")

    def save(self) -> None:
        import faiss

        self.dir.mkdir(parents=True, exist_ok=True)
        rows = "".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in self.chunks.values())
        _atomic_write(self.dir / CHUNKS, rows.encode("utf-8"))
        _atomic_write(self.dir / VECTORS, faiss.serialize_index(self.vectors).tobytes())
        manifest = {"version": FORMAT_VERSION, "embedder": EMBEDDER_NAME, "chunk_chars": self.chunk_chars,
                    "next_id": self.next_id, "files": self.files}
        _atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))

    def _remove_file(self, source: str) -> None:
        ids = self.files.pop(source)["chunk_ids"]
        if ids:
            self.vectors.remove_ids(np.asarray(ids, dtype=np.int64))
        for chunk_id in ids:
            self.chunks.pop(chunk_id, None)

    def update(self, folder: Path, warn: Callable[[str], None],
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> UpdateSummary:
        """Bring the index in line with the folder's files; returns what changed."""
        summary = UpdateSummary()
        found = list(corpus_files(folder, warn, max_file_bytes))
        seen = {source for _, source in found}
        for source in [s for s in self.files if s not in seen]:
            self._remove_file(source)
            summary.removed_files += 1
        new_chunks: list[Chunk] = []
        for path, source in found:
            try:
                stat = path.stat()
                known = self.files.get(source)
                if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
                    summary.unchanged_files += 1
                    continue
                digest = _file_hash(path)
                if known and known["sha256"] == digest:
                    known["mtime_ns"] = stat.st_mtime_ns
                    summary.unchanged_files += 1
                    continue
                document = read_document(path, source)
            except (OSError, ResearchError, UnicodeError) as exc:
                warn(f"skipped {source}: {exc}")
                summary.skipped_files += 1
                continue
            if known:
                self._remove_file(source)
            chunks = chunk_document(document, self.next_id, self.chunk_chars)
            if not chunks:
                warn(f"skipped {source}: no text in it")
                summary.skipped_files += 1
                continue
            self.next_id += len(chunks)
            self.files[source] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest,
                                  "chunk_ids": [c.chunk_id for c in chunks]}
            new_chunks.extend(chunks)
            summary.added_files += 1
        if new_chunks:
            vectors = self.embedder.encode([c.indexed_text for c in new_chunks])
            self.vectors.add_with_ids(vectors, np.asarray([c.chunk_id for c in new_chunks], dtype=np.int64))
            self.chunks.update((c.chunk_id, c) for c in new_chunks)
        if not self.chunks:
            raise ResearchError(f"--docs {folder}: no usable documents (supported: .md, .txt, .rst, .html, .pdf)")
        summary.chunks = len(self.chunks)
        self.save()
        return summary

    def dense_search(self, query_vectors: np.ndarray, k: int) -> list[list[int]]:
        """Chunk ids by cosine similarity, best first, one list per query row."""
        k = min(k, self.vectors.ntotal)
        _, ids = self.vectors.search(query_vectors, k)
        return [[int(i) for i in row if i >= 0] for row in ids]
