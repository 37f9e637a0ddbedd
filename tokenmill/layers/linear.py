"""Linear layers whose weights belong to a quantization method, filled through per-parameter loaders.

A `QuantMethod` creates a layer's parameters, post-processes them once the checkpoint is loaded
(repacking for its kernel) and applies the matmul; the layer itself only knows its shapes. Fused layers
(q/k/v, gate/up) hold several checkpoint tensors as row shards of one weight, so one matmul serves them;
the loader finds the shard by name through the model's packed-module map.

Weights are allocated empty: the loader (or random init) fills them, and skipping PyTorch's default init
saves seconds on big models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import ModelLoadError


class QuantMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: LinearBase, dtype: torch.dtype, device: torch.device) -> None:
        """Register the layer's parameters (each with a `weight_loader`) for layer.input_size -> output_size."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Turn loaded weights into what `apply` runs on (repacking, transposing); once, after loading."""

    @abstractmethod
    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        """x [..., input_size] -> [..., output_size]."""

    def for_layer(self, layer: LinearBase) -> QuantMethod:
        """The method this layer uses: this one, unless the method leaves such layers alone (a quantized
        method keeps the LM head in float); called once, before create_weights."""
        return self


class UnquantizedLinearMethod(QuantMethod):
    """Weights in the model dtype. `prepack_cpu`: reorder bfloat16/float16 weights into oneDNN's blocked
    layout, whose matrix-vector products read memory about 1.5x faster than F.linear's on AVX-512 CPUs
    (docs/perf.md); float32 stays with F.linear (MKL), which already reads at the machine's bandwidth."""

    def __init__(self, prepack_cpu: bool = False) -> None:
        self.prepack_cpu = prepack_cpu

    def create_weights(self, layer: LinearBase, dtype: torch.dtype, device: torch.device) -> None:
        weight = torch.empty(layer.output_size, layer.input_size, dtype=dtype, device=device)
        layer.weight = _parameter(weight, layer.weight_loader)
        layer.bias = _parameter(torch.empty(layer.output_size, dtype=dtype, device=device), layer.weight_loader) \
            if layer.has_bias else None

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight = layer.weight
        if not (self.prepack_cpu and weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
                and torch.backends.mkldnn.is_available()):
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        if layer.weight_is_shared:
            # A tied LM head: the embedding still looks rows up in the plain matrix, so the packed one is a
            # copy (one more vocab x hidden matrix of memory, for the largest matmul of a small model's step).
            layer.packed_weight = packed
        else:
            layer.weight = nn.Parameter(packed, requires_grad=False)
            layer.packed_weight = layer.weight
        layer.prepacked = True

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if layer.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, layer.bias, "none", [], "")
        return F.linear(x, layer.weight, layer.bias)


class OutputDelta(Protocol):
    """Something added to a layer's output after its quant method ran (a LoRA: tokenmill/lora/layer.py)."""

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor: ...


class LinearBase(nn.Module):
    """y = x W^T + b, with W made of row shards (one per checkpoint tensor fused into this layer)."""

    keeps_float_weights = False  # True where quantized methods must not apply (QuantMethod.for_layer)

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        quant_method: QuantMethod | None = None,
        shard_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.has_bias = bias
        names = list(shard_names) if shard_names is not None else [str(i) for i in range(len(self.output_sizes))]
        offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.shards = {name: (offset, size) for name, offset, size in zip(names, offsets, self.output_sizes)}
        self.weight_is_shared = False  # tied to another module's weight: never repacked in place
        self.prepacked = False
        self.packed_weight: torch.Tensor | None = None  # the weight in the kernel's layout, when prepacked
        self.quant_method = (quant_method or UnquantizedLinearMethod()).for_layer(self)
        self.quant_method.create_weights(self, dtype, device)
        self.lora: OutputDelta | None = None  # set on the layers adapters may target when LoRA is enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x)
        return out if self.lora is None else self.lora.add_to(x, out)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        """Copy a checkpoint tensor into `param`, into its rows for `shard` when the layer is fused."""
        target = param.data
        if shard is not None:
            if shard not in self.shards:
                raise ModelLoadError(f"{type(self).__name__} has no shard {shard!r} (has {', '.join(self.shards)})")
            offset, size = self.shards[shard]
            target = target.narrow(0, offset, size)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ModelLoadError(f"shape {tuple(loaded.shape)} does not fit {tuple(target.shape)}")
        target.copy_(loaded)  # converts dtype and moves to the layer's device


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype, device: torch.device,
                 quant_method: QuantMethod | None = None) -> None:
        super().__init__(input_size, [output_size], bias, dtype, device, quant_method)


class MergedLinear(LinearBase):
    """Several projections of the same input in one matmul (q/k/v, gate/up); shards named after them."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], shard_names: Sequence[str], bias: bool,
                 dtype: torch.dtype, device: torch.device, quant_method: QuantMethod | None = None) -> None:
        super().__init__(input_size, output_sizes, bias, dtype, device, quant_method, shard_names)


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(ReplicatedLinear):
    """The output projection: a linear layer like the others, or the embedding's matrix when tied."""

    # Quantized methods leave the head in float: logits are sensitive to it, and a tied head is the embedding.
    keeps_float_weights = True

    def tie_to(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight
        self.weight_is_shared = True


def _parameter(tensor: torch.Tensor, loader: object) -> nn.Parameter:
    param = nn.Parameter(tensor, requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param
