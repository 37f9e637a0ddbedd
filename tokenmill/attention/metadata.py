"""Per-step attention metadata, set by whoever runs a forward pass and read by the attention layers.

A context variable (not a module global) so that two models in one process (target and draft) never see
each other's step. The backend's per-step plan (masks, gather indices) is built from this once, by the
first layer that needs it, and shared by the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Describes the flat token batch of one step.

    Sequence i owns query tokens [query_start_loc[i], query_start_loc[i+1]) of the flat batch, which sit at
    positions [seq_lens[i] - num_query_i, seq_lens[i]) of that sequence. Keys and values for all
    positions < seq_lens[i] live in the paged cache at the blocks block_tables[i].
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    block_size: int
    # Host copies (numpy), so the CPU path never syncs with the device to read them.
    seq_lens: np.ndarray  # [num_seqs] int64: context length after this step
    query_start_loc: np.ndarray  # [num_seqs + 1] int64
    block_tables_host: np.ndarray  # block_tables on the host
    # What every layer would otherwise rebuild from the above (masks, gather indices): the first layer of
    # the step fills it, the others reuse it. Keyed by the backend and its per-layer options.
    plans: dict[Any, Any] = field(default_factory=dict)
    # seq_lens on the device, set for steps padded to a CUDA-graph batch size (worker/cuda_graphs.py). A graph
    # replays without Python, so a backend that captures (`supports_cuda_graphs`) must read lengths from here
    # and size its launch grids from static bounds (block_tables.shape), never from the host arrays above.
    seq_lens_device: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max()) if len(self.seq_lens) else 0


_current: ContextVar[AttentionMetadata | None] = ContextVar("tokenmill_forward_context", default=None)


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    token = _current.set(metadata)
    try:
        yield
    finally:
        _current.reset(token)


def get_attention_metadata() -> AttentionMetadata:
    metadata = _current.get()
    if metadata is None:
        raise RuntimeError("attention ran outside a forward_context; whoever runs the model must set one")
    return metadata


def slot_mapping_for(
    start_positions: np.ndarray, query_lens: np.ndarray, block_tables: np.ndarray, block_size: int
) -> np.ndarray:
    """Cache slot of every new token: block_table[pos // block_size] * block_size + pos % block_size."""
    total = int(query_lens.sum())
    seq_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
    first_token = np.cumsum(query_lens) - query_lens
    positions = start_positions[seq_of_token] + (np.arange(total) - first_token[seq_of_token])
    blocks = block_tables[seq_of_token, positions // block_size]
    return blocks * block_size + positions % block_size


def build_attention_metadata(
    start_positions: Sequence[int],
    query_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Metadata for sequences that each compute query_lens[i] tokens starting at start_positions[i].

    For callers outside the model runner's persistent batch (draft model, profiling, tests)."""
    starts = np.asarray(start_positions, dtype=np.int64)
    lens = np.asarray(query_lens, dtype=np.int64)
    max_blocks = max((len(t) for t in block_tables), default=0)
    tables = np.zeros((len(block_tables), max(max_blocks, 1)), dtype=np.int64)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = table
    slots = slot_mapping_for(starts, lens, tables, block_size)
    return AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(device),
        block_tables=torch.from_numpy(tables).to(device),
        block_size=block_size,
        seq_lens=starts + lens,
        query_start_loc=np.concatenate(([0], np.cumsum(lens))).astype(np.int64),
        block_tables_host=tables,
    )
