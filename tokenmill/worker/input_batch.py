"""The persistent input batch: per-request block tables and the step's flat input buffers, kept across steps.

Each request owns a row of a preallocated block-table array, updated with only the blocks it gained since
the last step; the step's token ids, positions and slot mapping are written into preallocated buffers
with vectorized numpy (no per-token Python loops), and the tensors the model reads are views of those
buffers (on a GPU: persistent device buffers filled by one copy each), so a CUDA graph can later capture
exactly these addresses.

The pinned host buffers are rewritten every step while their copies to the device may still be queued.
That is safe because every step ends by reading its sampled ids on the host, after which those copies have
run. Asynchronous scheduling keeps that true: the worker runs its steps one after another on one thread
(worker/async_step.py), so the host prepares step n+1 only after step n's ids were read.

Under asynchronous scheduling a decode chunk may carry a placeholder for the token its request sampled in
the previous step. Each request's last sampled token stays on the device (`_last_token`, by row), and
`prepare` gathers the placeholders' ids from it into the input_ids buffer, on the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.core.sched_io import ScheduledChunk, SchedulerOutput


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attention: AttentionMetadata
    # Chunks that sample this step (indices into scheduler_output.chunks) and the flat rows whose hidden
    # states give logits: the last token, or the last 1 + num_spec_tokens when verifying drafts. Chunk
    # sampling_chunks[i] owns logits rows [logits_row_starts[i], + 1 + its num_spec_tokens).
    sampling_chunks: list[int]
    logits_indices: torch.Tensor | None  # None: every flat row, in order (a step of plain decodes)
    logits_row_starts: list[int]

    # The same step padded to a CUDA-graph batch size (None: not a graph step); its leading rows are the
    # tensors above (the same memory), the rest harmless padding rows (worker/cuda_graphs.py).
    padded: PaddedStep | None = None
    # Per token: the LoRA slot of its request's adapter, -1 for the base model; None when no chunk has one.
    lora_slots: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class PaddedStep:
    """A decode step of n requests padded to `size` rows, every tensor at the same address each step."""

    input_ids: torch.Tensor  # [size]
    positions: torch.Tensor  # [size]
    attention: AttentionMetadata  # slot_mapping [size], block_tables [size, max_blocks], seq_lens_device [size]
    num_real: int  # n: rows [0, n) are the step's requests

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


class InputBatch:
    def __init__(self, max_num_tokens: int, max_blocks_per_request: int, block_size: int,
                 device: torch.device, initial_rows: int = 64, max_graph_batch: int = 0) -> None:
        self.block_size = block_size
        self.device = device
        self.max_blocks = max_blocks_per_request
        self._block_tables = np.zeros((initial_rows, max_blocks_per_request), dtype=np.int64)
        self._num_blocks = np.zeros(initial_rows, dtype=np.int64)
        self._row_of: dict[str, int] = {}
        self._free_rows = list(range(initial_rows - 1, -1, -1))
        self._last_token = torch.zeros(initial_rows, dtype=torch.int64, device=device)  # per row
        # Host buffers (pinned on a GPU machine, so the copies to the device buffers are asynchronous) and
        # numpy views of them that the step writes into.
        pin = device.type == "cuda"
        self._host = {name: torch.zeros(max_num_tokens, dtype=torch.int64, pin_memory=pin)
                      for name in ("input_ids", "positions", "slots")}
        self._input_ids, self._positions, self._slots = (self._host[n].numpy() for n in ("input_ids", "positions", "slots"))
        # Padded graph steps also read a full-width block table and the lengths from fixed device buffers.
        pin_graph = pin and max_graph_batch > 0
        self._host["graph_tables"] = torch.zeros(max_graph_batch, max_blocks_per_request, dtype=torch.int64,
                                                 pin_memory=pin_graph)
        self._host["graph_seq_lens"] = torch.zeros(max_graph_batch, dtype=torch.int64, pin_memory=pin_graph)
        self._device = {name: host if device.type == "cpu" else torch.empty_like(host, device=device)
                        for name, host in self._host.items()}

    def remove(self, req_id: str) -> None:
        row = self._row_of.pop(req_id, None)
        if row is not None:
            self._num_blocks[row] = 0
            self._free_rows.append(row)

    def record_sampled(self, req_ids: list[str], tokens: list[int]) -> None:
        """The last token each of these requests sampled, which a placeholder in its next step stands for."""
        rows = [self._row_of[req_id] for req_id in req_ids]
        if rows:
            self._last_token[torch.tensor(rows, dtype=torch.int64, device=self.device)] = \
                torch.tensor(tokens, dtype=torch.int64).to(self.device, non_blocking=True)

    def reset_blocks(self, req_id: str) -> None:
        """The request's blocks changed wholesale (recomputed after a preemption)."""
        row = self._row_of.get(req_id)
        if row is not None:
            self._num_blocks[row] = 0

    def prepare(self, scheduler_output: SchedulerOutput, pad_to: int | None = None, pad_block: int = 0) -> StepInputs:
        """The step's inputs; with pad_to, a step of plain decodes is also laid out as `padded` (pad_to rows,
        the extra ones reading and writing only block pad_block, which no request owns)."""
        chunks = scheduler_output.chunks
        count = len(chunks)
        rows = np.fromiter((self._sync_block_table(c.req_id, c.block_table) for c in chunks), np.int64, count)
        query_lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, count)
        starts = np.fromiter((c.start_pos for c in chunks), np.int64, count)
        num_tokens = int(query_lens.sum())
        if num_tokens > len(self._input_ids):
            raise ValueError(f"a step of {num_tokens} tokens exceeds the batch's {len(self._input_ids)}")
        ids = [c.token_ids[0] for c in chunks] if num_tokens == count else \
            list(itertools.chain.from_iterable(c.token_ids for c in chunks))
        self._input_ids[:num_tokens] = ids
        cu_query = np.cumsum(query_lens)
        if num_tokens == count:
            positions = starts
            seq_of_token = np.arange(count)
        else:
            seq_of_token = np.repeat(np.arange(count), query_lens)
            positions = starts[seq_of_token] + np.arange(num_tokens) - (cu_query - query_lens)[seq_of_token]
        self._positions[:num_tokens] = positions
        seq_lens = starts + query_lens
        max_blocks = max(-(-int(seq_lens.max()) // self.block_size), 1)
        tables = self._block_tables[rows, :max_blocks]
        self._slots[:num_tokens] = tables[seq_of_token, positions // self.block_size] * self.block_size \
            + positions % self.block_size

        sampling_chunks, row_starts, logits_rows = [], [], []
        for index, chunk in enumerate(chunks):
            if chunk.sample:
                sampling_chunks.append(index)
                row_starts.append(len(logits_rows))
                end = int(cu_query[index])
                logits_rows.extend(range(end - 1 - chunk.num_spec_tokens, end))
        every_row = len(logits_rows) == num_tokens  # then the rows are 0..num_tokens-1 in order
        graph_step = pad_to is not None and every_row and num_tokens == count <= pad_to
        if graph_step:
            self._write_padding(count, pad_to, pad_block, tables, self._num_blocks[rows], seq_lens)
        length = pad_to if graph_step else num_tokens
        metadata = AttentionMetadata(
            slot_mapping=self._host["slots"][:0],  # set below, once padding rows (if any) are written
            block_tables=torch.from_numpy(tables).to(self.device, non_blocking=True),
            block_size=self.block_size,
            seq_lens=seq_lens,
            query_start_loc=np.concatenate(([0], cu_query)),
            block_tables_host=tables,
        )
        input_ids, positions, slots = (self._view(name, length) for name in ("input_ids", "positions", "slots"))
        placeholders = [index for index, chunk in enumerate(chunks) if chunk.placeholder]
        if placeholders:  # each is its chunk's last token: the request's last sampled one, gathered on the device
            flat = torch.from_numpy(cu_query[placeholders] - 1).to(self.device, non_blocking=True)
            owners = torch.from_numpy(rows[placeholders]).to(self.device, non_blocking=True)
            input_ids.index_copy_(0, flat, self._last_token[owners])
        metadata.slot_mapping = slots[:num_tokens]
        padded = self._padded_step(input_ids, positions, slots, count) if graph_step else None
        return StepInputs(
            input_ids=input_ids[:num_tokens],
            positions=positions[:num_tokens],
            attention=metadata,
            sampling_chunks=sampling_chunks,
            logits_indices=None if every_row else torch.tensor(logits_rows, dtype=torch.int64, device=self.device),
            logits_row_starts=row_starts,
            padded=padded,
            lora_slots=self._lora_slots(chunks, query_lens),
        )

    def _lora_slots(self, chunks: list[ScheduledChunk], query_lens: np.ndarray) -> torch.Tensor | None:
        adapter_slots = np.fromiter((c.lora_slot for c in chunks), np.int64, len(chunks))
        if not (adapter_slots >= 0).any():
            return None
        return torch.from_numpy(np.repeat(adapter_slots, query_lens)).to(self.device, non_blocking=True)

    def _write_padding(self, count: int, pad_to: int, pad_block: int, tables: np.ndarray, owned: np.ndarray,
                       seq_lens: np.ndarray) -> None:
        """Host rows of a graph step: the requests' tables and lengths, then padding rows that hold token 0 at
        position 0 and see only block pad_block (their KV lands there; nobody reads it)."""
        if pad_to > len(self._host["graph_seq_lens"]):
            raise ValueError(f"a graph step of {pad_to} rows exceeds the {len(self._host['graph_seq_lens'])} "
                             f"allocated (max_graph_batch)")
        self._input_ids[count:pad_to] = 0
        self._positions[count:pad_to] = 0
        self._slots[count:pad_to] = pad_block * self.block_size
        graph_tables = self._host["graph_tables"].numpy()
        # Past its own `owned` blocks a row holds pad_block, never ids left by an earlier request or step.
        graph_tables[:pad_to] = pad_block
        width = tables.shape[1]
        graph_tables[:count, :width] = np.where(np.arange(width) < owned[:, None], tables, pad_block)
        graph_seq_lens = self._host["graph_seq_lens"].numpy()
        graph_seq_lens[:count] = seq_lens
        graph_seq_lens[count:pad_to] = 1

    def _padded_step(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     count: int) -> PaddedStep:
        size = int(input_ids.shape[0])
        metadata = AttentionMetadata(
            slot_mapping=slots,
            block_tables=self._view("graph_tables", size),
            block_size=self.block_size,
            seq_lens=self._host["graph_seq_lens"].numpy()[:size].copy(),
            query_start_loc=np.arange(size + 1, dtype=np.int64),
            block_tables_host=self._host["graph_tables"].numpy()[:size].copy(),
            seq_lens_device=self._view("graph_seq_lens", size),
        )
        return PaddedStep(input_ids, positions, metadata, count)

    def _sync_block_table(self, req_id: str, table: list[int]) -> int:
        """The request's row, with the blocks it gained since last step appended (O(new blocks))."""
        row = self._row_of.get(req_id)
        if row is None:
            row = self._row_of[req_id] = self._new_row()
        stored = int(self._num_blocks[row])
        if len(table) > self.max_blocks:
            raise ValueError(f"request {req_id!r} has {len(table)} blocks; rows hold {self.max_blocks}")
        if len(table) < stored:  # shrank: rewrite from scratch
            stored = 0
        if len(table) > stored:
            self._block_tables[row, stored : len(table)] = table[stored:]
            self._num_blocks[row] = len(table)
        return row

    def _new_row(self) -> int:
        if not self._free_rows:  # more live requests (running + preempted) than rows: double the table
            old = len(self._num_blocks)
            self._block_tables = np.concatenate([self._block_tables, np.zeros_like(self._block_tables)])
            self._num_blocks = np.concatenate([self._num_blocks, np.zeros_like(self._num_blocks)])
            self._last_token = torch.cat([self._last_token, torch.zeros_like(self._last_token)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _view(self, name: str, length: int) -> torch.Tensor:
        buffer = self._device[name]
        if buffer is not self._host[name]:
            buffer[:length].copy_(self._host[name][:length], non_blocking=True)
        return buffer[:length]
