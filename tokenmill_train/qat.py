"""Quantization-aware training: the decoder's linear layers compute with fake-quantized weights
(dequantize(quantize(w)), the weights the quantized checkpoint will hold) while gradients pass straight through to
the float weights (straight-through estimator). After training, the quantized checkpoint is written by
`tokenmill quantize`'s round-to-nearest, the very quantizer the forward used, so the exported model computes
what was trained.

The fake quantization is a per-module forward (an instance attribute), so parameter names, state dicts and
resumable checkpoints are those of plain training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.weight_quantizer import WeightQuantizer, default_spec

QAT_METHODS = ("int8", "int4", "w2")
QUANTIZED_DIR = "quantized"  # the exported quantized checkpoint, inside the run's output folder


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers `tokenmill quantize` quantizes: every one inside the decoder layers (not the LM head)."""
    return {f"model.layers.{i}.{name}": module for i, layer in enumerate(model.model.layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def qat_spec(method: str, model: nn.Module, group_size: int | None = None) -> QuantSpec:
    if method not in QAT_METHODS:
        raise ValueError(f"--qat {method!r} is not supported (one of {', '.join(QAT_METHODS)})")
    widths = [m.in_features for m in decoder_linears(model).values()]
    spec = default_spec(method, widths, group_size)
    for name, width in zip(decoder_linears(model), widths):
        if spec.group_size and width % spec.group_size:
            raise ValueError(f"--qat-group-size {spec.group_size} does not divide the width {width} of {name}")
    return spec


def fake_quantized(weight: torch.Tensor, quantizer: WeightQuantizer) -> torch.Tensor:
    """Forward: the quantized weight; backward: the identity (straight-through)."""
    with torch.no_grad():
        quantized = quantizer.fake(weight).to(weight.dtype)
    return weight + (quantized - weight).detach()


def _fake_quant_forward(module: nn.Linear, quantizer: WeightQuantizer) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantized(module.weight, quantizer), module.bias)
    return forward


def enable_fake_quant(model: nn.Module, spec: QuantSpec) -> int:
    """Make every decoder linear layer compute with fake-quantized weights; returns how many."""
    quantizer = WeightQuantizer(spec)
    linears = decoder_linears(model)
    for module in linears.values():
        module.forward = _fake_quant_forward(module, quantizer)  # shadows nn.Linear.forward on this instance
    return len(linears)


def export_quantized(float_dir: str | Path, spec: QuantSpec, log: Callable[[str], None]) -> dict[str, Any]:
    """Write `<float_dir>/quantized`: the trained float checkpoint quantized by the forward's own quantizer."""
    from tokenmill.tools.quantize_model import QuantizeOptions, quantize_checkpoint

    options = QuantizeOptions(method=spec.method, algo="rtn", group_size=spec.group_size, zero_point=spec.zero_point)
    out = Path(float_dir) / QUANTIZED_DIR
    summary = quantize_checkpoint(float_dir, out, options, log=log)
    return {"dir": str(out), "spec": spec.to_config(), "bytes": summary.bytes_after}
