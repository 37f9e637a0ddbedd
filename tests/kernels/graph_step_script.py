"""A padded decode step as the CUDA-graph path lays it out (lengths in `seq_lens_device`, padding rows of length
1 on a scratch block), attended by the triton backend twice with one plan: the second time with new lengths and
block tables written into the same tensors, as a graph replay sees them. Prints the largest difference of the
real rows from the twin, each time, as JSON. Run under TRITON_INTERPRET=1 by test_triton_backend_graph_step.py."""

from __future__ import annotations

import json

import numpy as np
import torch

from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.triton_backend import TritonAttentionBackend
from tokenmill.kernels.reference import paged_decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, WIDTH, ROWS, REAL = 4, 2, 16, 16, 40, 4, 2
NUM_BLOCKS = REAL * WIDTH + 1  # a table width of 640 tokens: the launch splits every context in 3
PAD_BLOCK = NUM_BLOCKS - 1


def fill(tables: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor, real_lens: list[int], seed: int) -> None:
    """Write a step's real rows (random distinct blocks) and padding rows into the persistent tensors."""
    order = torch.randperm(PAD_BLOCK, generator=torch.Generator().manual_seed(seed))
    tables.fill_(PAD_BLOCK)
    lens.fill_(1)
    slots.fill_(PAD_BLOCK * BLOCK_SIZE)
    for row, length in enumerate(real_lens):
        owned = -(-length // BLOCK_SIZE)
        tables[row, :owned] = order[row * WIDTH : row * WIDTH + owned]
        lens[row] = length
        slots[row] = tables[row, (length - 1) // BLOCK_SIZE] * BLOCK_SIZE + (length - 1) % BLOCK_SIZE


def main() -> None:
    torch.manual_seed(0)
    backend = TritonAttentionBackend()
    cache = torch.randn(backend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM))
    tables = torch.zeros(ROWS, WIDTH, dtype=torch.int64)
    lens = torch.zeros(ROWS, dtype=torch.int64)
    slots = torch.zeros(ROWS, dtype=torch.int64)
    fill(tables, lens, slots, [70, 9], seed=1)
    metadata = AttentionMetadata(slot_mapping=slots, block_tables=tables, block_size=BLOCK_SIZE,
                                 seq_lens=np.full(ROWS, -7), query_start_loc=np.arange(ROWS + 1),
                                 block_tables_host=np.zeros((ROWS, WIDTH), dtype=np.int64), seq_lens_device=lens)
    errors = []
    for step, real_lens in enumerate(([70, 9], [3, 77])):
        fill(tables, lens, slots, real_lens, seed=step + 1)
        query, key, value = (torch.randn(ROWS, h, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
        got = backend.forward(query, key, value, cache, metadata, HEAD_DIM ** -0.5, None)
        want = paged_decode_attention(query[:REAL], cache, tables[:REAL], lens[:REAL], HEAD_DIM ** -0.5)
        errors.append((got[:REAL] - want).abs().max().item())
    plan = next(iter(metadata.plans.values()))
    print(json.dumps({"errors": errors, "plans_built": len(metadata.plans),
                      "partitions": plan.num_partitions(KV_HEADS), "finite": bool(torch.isfinite(got).all())}))


if __name__ == "__main__":
    main()
