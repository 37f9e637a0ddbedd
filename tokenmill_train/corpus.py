"""Training text: hold out a split, tokenize, pack, and batch resumably.

Gathering and reading the files (with deduplication) is the engine's `tokenmill.utils.text_files`, shared
with `tokenmill bench --prompt-files`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tokenmill.utils.text_files import Document


def split_holdout(
    docs: Sequence[Document], fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split by whole documents (no document straddles both sides), seeded. At least one document is held
    out when there are two or more, so there is always something to evaluate on."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--holdout-fraction must be in [0, 1), got {fraction}")
    n = len(docs)
    n_held = 0 if n < 2 or fraction == 0 else min(n - 1, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_idx = set(order[:n_held])
    train = [d for i, d in enumerate(docs) if i not in held_idx]
    held = [d for i, d in enumerate(docs) if i in held_idx]
    return train, held


def tokenize_and_join(tokenizer: Any, texts: Sequence[str], eos_id: int, chunk: int = 1024) -> np.ndarray:
    """One flat int32 stream: doc_0 EOS doc_1 EOS ...; the EOS teaches the model where documents end."""
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.int32)
    for start in range(0, len(texts), chunk):
        for enc in tokenizer.encode_batch(list(texts[start : start + chunk]), add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.int32))
            parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def pack_rows(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """Cut a token stream into rows of seq_len + 1 tokens (inputs = row[:-1], targets = row[1:]).

    Rows overlap by one token so every token is a target exactly once; the tail that does not fill a row
    is dropped (no padding). Rows stay int32 (half the memory of int64); batches are widened on the way out.
    """
    n_rows = (len(stream) - 1) // seq_len
    if n_rows <= 0:
        return torch.zeros(0, seq_len + 1, dtype=torch.int32)
    idx = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int32))


class PackedLoader:
    """Shuffled batches of packed rows whose position (epoch, cursor) is part of the checkpoint.

    Each epoch's order is a permutation seeded by (seed, epoch), so restoring (epoch, cursor) replays exactly
    the batches an uninterrupted run would have seen.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int) -> None:
        if len(rows) < batch_size:
            raise ValueError(
                f"the training split packs into {len(rows)} rows but --batch-size is {batch_size}: "
                "add data, or lower --batch-size or --context-length"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g)

    def next_batch(self) -> torch.Tensor:
        if self.cursor + self.batch_size > len(self.rows):
            # Drop the epoch's ragged tail so every batch has the same shape.
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.rows[idx].long()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
