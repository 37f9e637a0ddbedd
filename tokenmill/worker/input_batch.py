"""Turn a SchedulerOutput into the flat tensors one forward pass needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.core.sched_io import SchedulerOutput
from tokenmill.worker.forward_context import AttentionMetadata, build_attention_metadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attention: AttentionMetadata
    # Chunks that sample this step (indices into scheduler_output.chunks) and the flat index of their
    # last token, whose hidden state gives the next-token logits.
    sampling_chunks: list[int]
    logits_indices: torch.Tensor


def build_step_inputs(scheduler_output: SchedulerOutput, block_size: int, device: torch.device) -> StepInputs:
    token_ids: list[int] = []
    positions: list[int] = []
    sampling_chunks: list[int] = []
    logits_indices: list[int] = []
    for i, chunk in enumerate(scheduler_output.chunks):
        token_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)))
        if chunk.sample:
            sampling_chunks.append(i)
            logits_indices.append(len(token_ids) - 1)
    attention = build_attention_metadata(
        start_positions=[c.start_pos for c in scheduler_output.chunks],
        query_lens=[len(c.token_ids) for c in scheduler_output.chunks],
        block_tables=[c.block_table for c in scheduler_output.chunks],
        block_size=block_size,
        device=device,
    )
    return StepInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        attention=attention,
        sampling_chunks=sampling_chunks,
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=device),
    )
