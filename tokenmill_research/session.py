"""What every research command opens: the indexed corpus and a model endpoint (a given --base-url, or a
local tokenmill server started for the duration)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenmill_research.corpus_store import CorpusStore, default_index_dir
from tokenmill_research.errors import ResearchError
from tokenmill_research.llm_client import LLMClient
from tokenmill_research.retrieval import Retriever

MAX_FILE_MB_LIMIT = 1024


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_corpus(docs: str, index_dir: str | None, max_file_mb: float) -> Retriever:
    """The docs folder's index, brought up to date (only changed files are re-read)."""
    from tokenmill_research.embedder import shared_embedder

    if not 0 < max_file_mb <= MAX_FILE_MB_LIMIT:
        raise ResearchError(f"--max-file-mb must be in (0, {MAX_FILE_MB_LIMIT}], got {max_file_mb}")
    folder = Path(docs)
    index = Path(index_dir) if index_dir else default_index_dir(folder)
    say(f"indexing {folder} -> {index}")
    store = CorpusStore(index, shared_embedder())
    summary = store.update(folder, warn, int(max_file_mb * (1 << 20)))
    say(f"index: {summary.chunks} chunks ({summary.added_files} files added or changed, {summary.removed_files} "
        f"removed, {summary.unchanged_files} unchanged, {summary.skipped_files} skipped)")
    return Retriever(store)


@contextmanager
def open_endpoint(base_url: str | None, model: str | None, api_key: str, fast_paths: bool = True) -> Iterator[LLMClient]:
    """A client of --base-url (the model named --model, or the endpoint's first), or of a local server."""
    if base_url:
        client = LLMClient(base_url, model or "", api_key)
        if not model:
            client.model = _first_model(client)
        yield client
        return
    from tokenmill_research.local_server import start_local_server

    say(f"starting a local tokenmill engine ({model or 'the default model'}; prefix caching "
        f"{'and prompt-lookup drafting on' if fast_paths else 'and drafting off'})")
    server = start_local_server(model, fast_paths=fast_paths)
    try:
        yield LLMClient(server.base_url, server.model_name)
    finally:
        server.stop()


def _first_model(client: LLMClient) -> str:
    from tokenmill_research.errors import EndpointError

    try:
        models = client.client.models.list().data
    except client._openai.APIError as exc:
        raise EndpointError(f"cannot list the models of {client.base_url} ({exc}); pass --model") from None
    if not models:
        raise EndpointError(f"{client.base_url} serves no model; pass --model")
    return models[0].id
