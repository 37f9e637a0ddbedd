"""CUDA graphs for decode steps: captured once per padded batch size, replayed over the persistent buffers.

A decode step launches hundreds of small kernels; at batch 1 on a big GPU their launch cost, not the
memory traffic, would set the pace. A graph replays the whole forward with one launch. It replays at fixed
addresses and shapes, so:
- the sizes are fixed up front (`capture_sizes`): 1, 2, 4, then every 8 up to max_num_seqs; a step of n
  requests runs the graph of the smallest size >= n (`padded_size`);
- the step's inputs are written into the input batch's persistent buffers (`InputBatch.prepare(pad_to=)`)
  and the padding rows read and write only the scratch block `pad_block` that the pool keeps aside;
- the attention backend must read only device tensors (`AttentionBackend.supports_cuda_graphs`).
Only plain decode steps (one token per request, every request sampling, no drafts) replay; prefill
chunks, draft verification and anything larger than the largest size run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from tokenmill.attention.base import AttentionBackend
from tokenmill.attention.metadata import forward_context
from tokenmill.core.sched_io import SchedulerOutput
from tokenmill.worker.input_batch import PaddedStep

logger = logging.getLogger(__name__)

# Sizes below the first multiple of SIZE_STEP; past it, a padding of at most SIZE_STEP - 1 rows wastes little
# against the weights every row of a step shares, and keeps the number of graphs (and their memory) small.
SMALL_SIZES = (1, 2, 4)
SIZE_STEP = 8


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to the most requests a decode step can hold."""
    largest = min(max_num_seqs, max_num_batched_tokens)
    sizes = {s for s in SMALL_SIZES if s < largest} | set(range(SIZE_STEP, largest, SIZE_STEP)) | {largest}
    return sorted(sizes)


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds num_seqs rows; None when none does (the step runs eagerly)."""
    index = bisect.bisect_left(sizes, num_seqs)
    return sizes[index] if index < len(sizes) and num_seqs > 0 else None


def is_plain_decode(scheduler_output: SchedulerOutput) -> bool:
    """One new token per request, each sampling, no drafts: the steps a graph replays."""
    return all(len(c.token_ids) == 1 and c.sample and not c.num_spec_tokens for c in scheduler_output.chunks)


def graphs_usable(device: torch.device, enforce_eager: bool, backend: AttentionBackend, model: nn.Module) -> bool:
    """On CUDA, unless enforce_eager, when the attention backend and every layer of the model can be
    captured (a layer that reads device values on the host says so with `cuda_graph_safe = False`)."""
    if device.type != "cuda" or enforce_eager or not backend.supports_cuda_graphs:
        return False
    unsafe = sorted({type(m).__name__ for m in model.modules() if not getattr(m, "cuda_graph_safe", True)})
    if unsafe:
        logger.info("no CUDA graphs: %s cannot be captured", ", ".join(unsafe))
    return not unsafe


class Replay(Protocol):
    """A captured step: run again over the persistent buffers, writing into its captured output."""

    output: torch.Tensor

    def replay(self, step: PaddedStep) -> None: ...


Capture = Callable[[Callable[[PaddedStep], torch.Tensor], PaddedStep], Replay]


class CudaGraphReplay:
    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor) -> None:
        self.graph = graph
        self.output = output

    def replay(self, step: PaddedStep) -> None:
        self.graph.replay()  # reads the persistent buffers the step was just written into


def capture_cuda_graph() -> Capture:
    """A Capture into torch.cuda graphs sharing one memory pool (captured largest first, the smaller ones
    reuse its memory)."""
    pool = torch.cuda.graph_pool_handle()

    def capture(run: Callable[[PaddedStep], torch.Tensor], step: PaddedStep) -> Replay:
        device = step.input_ids.device
        # Warm up off the capture stream (as torch.cuda.graphs advises): lazy inits, autotuning, cuBLAS
        # workspaces happen here, not inside the graph.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run(step)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = run(step)
        return CudaGraphReplay(graph, output)

    return capture


@dataclass(frozen=True)
class _Addresses:
    """Where a padded step's tensors live; a replay is only right if the next step's live at the same place."""

    pointers: tuple[tuple[int, tuple[int, ...]], ...]

    @classmethod
    def of(cls, step: PaddedStep) -> _Addresses:
        meta = step.attention
        tensors = [step.input_ids, step.positions, meta.slot_mapping, meta.block_tables, meta.seq_lens_device]
        return cls(tuple((t.data_ptr(), tuple(t.shape)) if t is not None else (0, ()) for t in tensors))


class DecodeGraphs:
    """The captured decode steps of one model runner, by padded batch size."""

    def __init__(self, sizes: list[int], pad_block: int) -> None:
        if not sizes:
            raise ValueError("no batch sizes to capture")
        self.sizes = sizes
        self.pad_block = pad_block  # the scratch block the padding rows use; the scheduler never hands it out
        self._graphs: dict[int, tuple[Replay, _Addresses]] = {}
        self.capture_seconds = 0.0

    def pad_to(self, scheduler_output: SchedulerOutput) -> int | None:
        """The size this step replays at, or None when it runs eagerly."""
        if not is_plain_decode(scheduler_output):
            return None
        return padded_size(len(scheduler_output.chunks), self.sizes)

    def capture(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                make_step: Callable[[int], PaddedStep], capture: Capture) -> None:
        """Capture every size, largest first; make_step(size) lays out a dummy step of that size in the
        persistent buffers (its KV writes go to pad_block only)."""
        started = time.perf_counter()

        def run(step: PaddedStep) -> torch.Tensor:
            step.attention.plans.clear()
            with forward_context(step.attention):
                return forward(step.input_ids, step.positions)

        for size in sorted(self.sizes, reverse=True):
            step = make_step(size)
            self._graphs[size] = (capture(run, step), _Addresses.of(step))
        self.capture_seconds = time.perf_counter() - started
        logger.info("captured %d decode graphs (batch %d..%d) in %.1f s", len(self.sizes), self.sizes[0],
                    self.sizes[-1], self.capture_seconds)

    def replay(self, step: PaddedStep) -> torch.Tensor:
        """Hidden states [num_real, hidden] of the step, from the graph of its size."""
        replay, addresses = self._graphs[step.size]
        if _Addresses.of(step) != addresses:
            raise RuntimeError(f"the padded step of size {step.size} is not laid out where its graph was captured; "
                               f"its inputs must be views of the input batch's persistent buffers")
        replay.replay(step)
        return replay.output[: step.num_real]
