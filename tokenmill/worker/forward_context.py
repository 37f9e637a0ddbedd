"""Per-step attention metadata, set by the model runner and read by attention layers.

A context variable (not a module global) so that two runners in one process (target and draft model)
never see each other's step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Describes the flat token batch of one step.

    Sequence i owns query tokens [query_start_loc[i], query_start_loc[i+1]) of the flat batch, which sit at
    positions [seq_lens[i] - num_query_i, seq_lens[i]) of that sequence. Keys and values for all
    positions < seq_lens[i] live in the paged cache at the blocks block_tables[i].
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    block_size: int
    # Host copies, so the CPU path never syncs with the device to read them.
    seq_lens_host: list[int]
    query_start_loc_host: list[int]
    max_query_len: int
    max_seq_len: int
    # What every layer's attention would otherwise rebuild from the above (masks, gather indices): the
    # first layer of the step fills it, the others reuse it. Keyed by the attention backend.
    layer_shared: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


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
        raise RuntimeError("attention ran outside a forward_context; the model runner must set one")
    return metadata


def build_attention_metadata(
    start_positions: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Flat metadata for sequences that each compute query_lens[i] tokens starting at start_positions[i]."""
    seq_lens = [s + q for s, q in zip(start_positions, query_lens)]
    query_start = [0]
    for q in query_lens:
        query_start.append(query_start[-1] + q)
    slots: list[int] = []
    for start, qlen, table in zip(start_positions, query_lens, block_tables):
        for pos in range(start, start + qlen):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    max_blocks = max((len(t) for t in block_tables), default=0)
    padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), max_blocks),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
        block_size=block_size,
        seq_lens_host=seq_lens,
        query_start_loc_host=query_start,
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )
