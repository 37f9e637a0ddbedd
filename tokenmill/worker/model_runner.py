"""Owns the persistent input buffers and the model's forward pass; nothing about requests or sampling.

This is the part a CUDA graph wraps: persistent input buffers in, hidden states out. With `compile`,
the model forward runs through torch.compile (inductor) with dynamic token counts; attention stays an
opaque custom op inside the graph (layers/attention.py). With `capture_graphs`, plain decode steps are
padded to a captured batch size and replayed (worker/cuda_graphs.py); every other step runs eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from tokenmill.attention.metadata import forward_context
from tokenmill.core.sched_io import ScheduledChunk, SchedulerOutput
from tokenmill.lora.layer import step_token_slots
from tokenmill.worker.cuda_graphs import Capture, DecodeGraphs
from tokenmill.worker.input_batch import InputBatch, PaddedStep, StepInputs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: nn.Module, compile_model: bool = False) -> None:
        self.model = model
        self.input_batch: InputBatch | None = None  # sized with the KV pool (allocate_inputs)
        self.compiled = compile_model
        self._forward = model.forward
        self._logits = model.compute_logits
        if compile_model:
            self._forward = compile_forward(model)
            self._logits = compile_forward(model.compute_logits)
        self.compile_seconds = 0.0
        self.graphs: DecodeGraphs | None = None  # set once captured

    def allocate_inputs(self, max_num_tokens: int, max_blocks_per_request: int, block_size: int,
                        device: torch.device, max_graph_batch: int = 0) -> None:
        self.input_batch = InputBatch(max_num_tokens, max_blocks_per_request, block_size, device,
                                      max_graph_batch=max_graph_batch)

    def prepare(self, scheduler_output: SchedulerOutput) -> StepInputs:
        """The step's inputs, written into the persistent buffers (padded too, when a graph will replay it)."""
        assert self.input_batch is not None, "allocate_inputs() must run first"
        if self.graphs is None:
            return self.input_batch.prepare(scheduler_output)
        return self.input_batch.prepare(scheduler_output, self.graphs.pad_to(scheduler_output), self.graphs.pad_block)

    @torch.inference_mode()
    def capture_graphs(self, graphs: DecodeGraphs, capture: Capture) -> None:
        """Capture a decode step at each of graphs.sizes; from then on plain decode steps replay them."""
        assert self.input_batch is not None, "allocate_inputs() must run first"
        input_batch = self.input_batch

        def dummy_step(size: int) -> PaddedStep:
            # One real row at position 0 on the scratch block, the rest padding: every KV write lands there.
            chunk = ScheduledChunk("cuda-graph-capture", [0], 0, [graphs.pad_block], sample=True)
            inputs = input_batch.prepare(SchedulerOutput(chunks=[chunk]), size, graphs.pad_block)
            input_batch.remove(chunk.req_id)
            assert inputs.padded is not None
            return inputs.padded

        graphs.capture(self._forward, dummy_step, capture)
        self.graphs = graphs

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the step's tokens."""
        if inputs.padded is not None and self.graphs is not None:
            return self.graphs.replay(inputs.padded)
        with forward_context(inputs.attention), step_token_slots(inputs.lora_slots):
            return self._forward(inputs.input_ids, inputs.positions)

    @torch.inference_mode()
    def forward_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The (compiled) forward on tensors of the caller's, inside the caller's forward context."""
        return self._forward(input_ids, positions)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """float32 logits of the rows that sample (every row when inputs.logits_indices is None)."""
        rows = hidden if inputs.logits_indices is None else hidden[inputs.logits_indices]
        return self._logits(rows)

    @torch.inference_mode()
    def warm_up(self, inputs: Iterable[StepInputs]) -> None:
        """Run these steps once (compiling, when compiled) and record how long that took. Each step's inputs
        are views of the persistent buffers, so `inputs` must prepare a step only after the last one ran."""
        started = time.perf_counter()
        for step in inputs:
            hidden = self.forward(step)
            self.logits(hidden, step)
        self.compile_seconds = time.perf_counter() - started
        if self.compiled:
            logger.info("torch.compile of the model forward took %.1f s", self.compile_seconds)


def compile_forward(model: nn.Module | Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """torch.compile (inductor) of the model, dynamic in the number of tokens.

    On the CPU (measured in docs/perf.md): freezing makes the weights constants that inductor prepacks;
    max-autotune lets its C++ GEMM templates compete with oneDNN/MKL per matrix shape (they read bf16
    weights ~25% faster at small batch); the C++ wrapper drops the Python call per kernel. Freezing and the
    wrapper are read from inductor's global config when a graph is lowered, not from `options`.
    """
    import torch._inductor.config as inductor_config

    options: dict[str, object] = {}
    module = model if isinstance(model, nn.Module) else model.__self__  # a bound method of the model
    if next(module.parameters()).device.type == "cpu":
        inductor_config.freezing = True
        inductor_config.cpp_wrapper = True
        options = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    return torch.compile(model, dynamic=True, options=options)
