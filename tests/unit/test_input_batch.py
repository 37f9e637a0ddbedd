"""The persistent input batch: exact ids, positions, slots and block tables, kept across steps."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.core.sched_io import ScheduledChunk, SchedulerOutput
from tokenmill.worker.input_batch import InputBatch

BLOCK = 4


def step(batch: InputBatch, *chunks: ScheduledChunk):
    return batch.prepare(SchedulerOutput(chunks=list(chunks)))


def test_a_mixed_step_has_exact_ids_positions_slots_and_logits_rows() -> None:
    batch = InputBatch(max_num_tokens=32, max_blocks_per_request=8, block_size=BLOCK, device=torch.device("cpu"))
    inputs = step(
        batch,
        ScheduledChunk("a", [11, 12, 13, 14, 15], 0, [7, 2], sample=True),  # a prompt, samples at its end
        ScheduledChunk("b", [21], 6, [5, 9], sample=True),  # a decode at position 6: block 9, offset 2
        ScheduledChunk("c", [31, 32, 33], 2, [4, 5], sample=False),  # a chunk that does not sample
        ScheduledChunk("d", [41, 42, 43], 3, [1, 3], sample=True, num_spec_tokens=2),  # verifying 2 drafts
    )
    assert inputs.input_ids.tolist() == [11, 12, 13, 14, 15, 21, 31, 32, 33, 41, 42, 43]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 6, 2, 3, 4, 3, 4, 5]
    assert inputs.attention.slot_mapping.tolist() == [28, 29, 30, 31, 8, 38, 18, 19, 20, 7, 12, 13]
    assert inputs.attention.seq_lens.tolist() == [5, 7, 5, 6]
    assert inputs.attention.query_start_loc.tolist() == [0, 5, 6, 9, 12]
    assert inputs.sampling_chunks == [0, 1, 3]
    assert inputs.logits_indices.tolist() == [4, 5, 9, 10, 11]
    assert inputs.logits_row_starts == [0, 1, 2]
    assert inputs.attention.block_tables.tolist() == [[7, 2], [5, 9], [4, 5], [1, 3]]


def test_plain_decodes_need_no_logits_gather_and_tables_grow_incrementally() -> None:
    batch = InputBatch(max_num_tokens=8, max_blocks_per_request=4, block_size=BLOCK, device=torch.device("cpu"))
    step(batch, ScheduledChunk("a", [1, 2, 3, 4], 0, [6], sample=True))
    inputs = step(batch, ScheduledChunk("a", [5], 4, [6, 3], sample=True))
    assert inputs.logits_indices is None  # every row samples, in order
    assert inputs.attention.slot_mapping.tolist() == [12]  # block 3, offset 0
    assert inputs.attention.block_tables_host.tolist() == [[6, 3]]


def test_buffers_are_persistent_views_and_rows_are_reused() -> None:
    batch = InputBatch(max_num_tokens=8, max_blocks_per_request=4, block_size=BLOCK, device=torch.device("cpu"),
                       initial_rows=2)
    first = step(batch, ScheduledChunk("a", [9], 0, [1], sample=True))
    second = step(batch, ScheduledChunk("a", [8], 1, [1], sample=True))
    assert first.input_ids.data_ptr() == second.input_ids.data_ptr()  # the same buffer, rewritten
    for name in "bcde":  # more live requests than rows: the table doubles and keeps the rows it had
        step(batch, ScheduledChunk(name, [1], 0, [ord(name) - 90], sample=True))
    inputs = step(batch, ScheduledChunk("a", [7], 2, [1], sample=True), ScheduledChunk("e", [7], 1, [11], sample=True))
    assert inputs.attention.block_tables.tolist() == [[1], [11]]
    batch.remove("a")
    inputs = step(batch, ScheduledChunk("f", [1], 0, [13], sample=True))
    assert inputs.attention.block_tables.tolist() == [[13]]


def test_a_resumed_request_gets_its_new_blocks() -> None:
    batch = InputBatch(max_num_tokens=8, max_blocks_per_request=4, block_size=BLOCK, device=torch.device("cpu"))
    step(batch, ScheduledChunk("a", [1, 2, 3, 4, 5], 0, [6, 7], sample=True))
    batch.reset_blocks("a")  # preempted and recomputed elsewhere
    inputs = step(batch, ScheduledChunk("a", [1, 2, 3, 4, 5], 0, [2, 9], sample=True))
    assert np.array_equal(inputs.attention.block_tables_host, [[2, 9]])
    assert inputs.attention.slot_mapping.tolist() == [8, 9, 10, 11, 36]


def test_a_placeholder_takes_its_requests_last_sampled_token_on_the_device() -> None:
    from tokenmill.core.sched_io import PLACEHOLDER_TOKEN_ID as PH

    batch = InputBatch(max_num_tokens=16, max_blocks_per_request=4, block_size=BLOCK, device=torch.device("cpu"),
                       initial_rows=2)
    step(batch, ScheduledChunk("a", [1, 2, 3], 0, [6], sample=True), ScheduledChunk("b", [7], 0, [2], sample=True))
    batch.record_sampled(["a", "b"], [40, 50])
    step(batch, ScheduledChunk("c", [8, 9], 0, [3], sample=True))  # a third request: the rows double
    batch.record_sampled(["c"], [60])
    inputs = step(batch, ScheduledChunk("b", [PH], 1, [2], sample=True, placeholder=True),
                  ScheduledChunk("c", [8, 9], 0, [3], sample=False),  # a known token: written from the host
                  ScheduledChunk("a", [PH], 3, [6], sample=True, placeholder=True))
    assert inputs.input_ids.tolist() == [50, 8, 9, 40]
    batch.record_sampled(["a"], [41])  # a's next step samples again; the next placeholder follows it
    assert step(batch, ScheduledChunk("a", [PH], 4, [6, 1], sample=True, placeholder=True)).input_ids.tolist() == [41]
