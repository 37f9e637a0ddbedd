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
    # Chunks that sample this step (indices into scheduler_output.chunks) and the flat indices whose
    # hidden states give logits: the last token, or the last 1 + num_spec_tokens when verifying drafts.
    # Chunk sampling_chunks[i] owns logits rows [logits_row_starts[i], + 1 + its num_spec_tokens).
    sampling_chunks: list[int]
    logits_indices: torch.Tensor
    logits_row_starts: list[int]


def build_step_inputs(scheduler_output: SchedulerOutput, block_size: int, device: torch.device) -> StepInputs:
    token_ids: list[int] = []
    positions: list[int] = []
    sampling_chunks: list[int] = []
    logits_indices: list[int] = []
    logits_row_starts: list[int] = []
    for i, chunk in enumerate(scheduler_output.chunks):
        token_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)))
        if chunk.sample:
            sampling_chunks.append(i)
            logits_row_starts.append(len(logits_indices))
            end = len(token_ids)
            logits_indices.extend(range(end - 1 - chunk.num_spec_tokens, end))
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
        logits_row_starts=logits_row_starts,
    )
