"""Run a decoder model one layer at a time over calibration windows, so each layer can be quantized with inputs
computed by the already quantized layers before it (GPTQ's and AWQ's sequential order).

The inputs of the first layer (and the rotary tables every layer is called with) are captured once from a full
forward; after a layer is quantized, `advance` recomputes its outputs, which become the next layer's inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tokenmill.attention.metadata import AttentionMetadata, build_attention_metadata, forward_context
from tokenmill.layers.linear import LinearBase
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches

BLOCK_SIZE = 16
DEFAULT_BATCH_WINDOWS = 16  # windows per forward: big enough for fast matmuls, small enough for the memory

InputHook = Callable[[str, torch.Tensor], None]  # (linear layer's name inside the decoder layer, its input)


def quantizable_linears(layer: nn.Module) -> dict[str, LinearBase]:
    """The linear layers of one decoder layer that quantization covers (a MoE router stays in float)."""
    routers = {id(m.gate) for m in layer.modules() if isinstance(m, SparseMoeBlock)}
    return {name: m for name, m in layer.named_modules() if isinstance(m, LinearBase) and id(m) not in routers}


class LayerWalk:
    def __init__(self, model: nn.Module, windows: list[list[int]],
                 batch_windows: int = DEFAULT_BATCH_WINDOWS) -> None:
        self.model = model
        self.layers: nn.ModuleList = model.model.layers
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        longest = max(len(w) for w in windows)
        blocks_per_window = math.ceil(longest / BLOCK_SIZE)
        allocate_kv_caches(model.attention_layers(), batch_windows * blocks_per_window, BLOCK_SIZE, self.dtype,
                           self.device)
        self.batches: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]] = []
        for start in range(0, len(windows), batch_windows):
            chunk = windows[start:start + batch_windows]
            tables = [list(range(i * blocks_per_window, (i + 1) * blocks_per_window)) for i in range(len(chunk))]
            metadata = build_attention_metadata([0] * len(chunk), [len(w) for w in chunk], tables, BLOCK_SIZE,
                                                self.device)
            ids = torch.tensor([t for w in chunk for t in w], device=self.device)
            positions = torch.cat([torch.arange(len(w), device=self.device) for w in chunk])
            self.batches.append((ids, positions, metadata))
        self.num_tokens = sum(len(w) for w in windows)
        self.states, self.extras = self._capture_layer_inputs()

    def _capture_layer_inputs(self) -> tuple[list[tuple], list[list[tuple]]]:
        """Per batch, the first layer's arguments; per layer and batch, the arguments after (hidden, residual)
        (the rotary tables it is called with). The layers are stood in for by a pass-through while the model
        runs, so this costs the embedding, not a forward."""
        states: list[tuple] = []
        extras: list[list[tuple]] = [[] for _ in self.layers]

        def hook(index: int) -> Callable:
            def record(module: nn.Module, args: tuple) -> None:
                if index == 0:
                    states.append(args)
                extras[index].append(args[2:])
            return record

        def pass_through(hidden: torch.Tensor, residual: torch.Tensor | None, *rest: object) -> tuple:
            return hidden, hidden if residual is None else residual

        handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(self.layers)]
        for layer in self.layers:
            layer.forward = pass_through  # an instance attribute: nn.Module.__call__ runs it after the hooks
        try:
            with torch.no_grad():
                for ids, positions, metadata in self.batches:
                    with forward_context(metadata):
                        self.model(ids, positions)
        finally:
            for layer in self.layers:
                del layer.forward
            for handle in handles:
                handle.remove()
        return states, extras

    @contextmanager
    def _input_hooks(self, index: int, on_input: InputHook) -> Iterator[None]:
        handles = [module.register_forward_hook(lambda m, args, out, name=name: on_input(name, args[0]))
                   for name, module in quantizable_linears(self.layers[index]).items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _run(self, index: int) -> list[tuple]:
        outputs = []
        with torch.no_grad():
            for (_, _, metadata), state, extra in zip(self.batches, self.states, self.extras[index]):
                with forward_context(metadata):
                    outputs.append(self.layers[index](state[0], state[1], *extra))
        return outputs

    def collect(self, index: int, on_input: InputHook) -> None:
        """Run layer `index` on its current inputs, handing every quantizable linear layer's input to on_input."""
        with self._input_hooks(index, on_input):
            self._run(index)

    def advance(self, index: int) -> None:
        """Recompute layer `index` (now quantized) and make its outputs the next layer's inputs."""
        if index + 1 < len(self.layers):
            self.states = [(hidden, residual) for hidden, residual in self._run(index)]
