"""The LM head quantized too, when the setting asks for it (`:head`, quant/settings.py).

By default a quantized model keeps its LM head in float (logits are the most sensitive output, and a tied
head is the embedding table). On a CPU that head is a large share of what a decode step reads: SmolLM2-135M's
tied 49,152 x 576 head is about a fifth of its bfloat16 weight bytes, so a model whose other layers read a
quarter of float's bytes is still held back by it. With `:head` the head loads in float as usual (a tied one
shares the embedding's table, which the embedding lookup still reads row by row), and is quantized after
loading by round-to-nearest with the model's own scheme; its matmul is then the quantized method's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokenmill.layers.linear import LinearBase, QuantMethod
from tokenmill.quant.codes import quantize_rtn

if TYPE_CHECKING:  # linear_method builds this class
    from tokenmill.quant.linear_method import QuantizedLinearMethod


class QuantizedLMHeadMethod(QuantMethod):
    def __init__(self, method: QuantizedLinearMethod, float_method: QuantMethod) -> None:
        self.method = method  # whose scheme, `prepare` and `matmul` the head uses
        self.float_method = float_method  # how the float weight is created and loaded

    def create_weights(self, layer: LinearBase, dtype: torch.dtype, device: torch.device) -> None:
        self.method.spec.groups(layer.input_size)  # a group size that does not divide the width: ConfigError now
        self.float_method.create_weights(layer, dtype, device)
        layer.compute_dtype = dtype

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight = layer.weight.detach()
        qweight, scales, qzeros = quantize_rtn(self.method.spec, weight.float())
        if not layer.weight_is_shared:  # a tied weight stays: it is the embedding table
            del layer.weight
        self.method.prepare(layer, qweight, scales, qzeros)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(layer, x)
