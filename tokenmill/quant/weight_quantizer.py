"""One weight quantizer for every algorithm: a spec plus how group parameters are chosen (RTN's min/max, or the
alternating fit). GPTQ asks it for a group's parameters, AWQ for fake-quantized weights during its search, the
tool and QAT for the canonical stored tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.quant.codes import QuantSpec, dequantize, quantize_rtn
from tokenmill.quant.group_quant import block_params, stored_tensors
from tokenmill.quant.w2_fit import fit_block, fit_weight

# Default group sizes, largest first: the first dividing every layer width is taken (SmolLM2's 576 takes 64 for
# int4). int8 and fp8: per output channel.
DEFAULT_GROUPS = {"int4": (128, 64, 32), "w2": (64, 32)}

StoredWeight = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (qweight, scales, qzeros)


@dataclass(frozen=True)
class WeightQuantizer:
    spec: QuantSpec
    fit: bool = False  # choose group scales/zeros by the alternating fit instead of RTN's min/max

    def __post_init__(self) -> None:
        if self.fit and (self.spec.group_size is None or not self.spec.zero_point):
            raise ValueError(f"the alternating fit needs a group size and a zero-point ({self.spec})")

    def block_params(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros [out] for one group of columns [out, group]."""
        return fit_block(self.spec, block) if self.fit else block_params(self.spec, block)

    def quantize(self, weight: torch.Tensor) -> StoredWeight:
        """float [out, in] -> the canonical stored tensors."""
        if not self.fit:
            return quantize_rtn(self.spec, weight)
        codes, scales, zeros = fit_weight(self.spec, weight)
        return stored_tensors(self.spec, codes, scales, zeros)

    def fake(self, weight: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(weight)) in float32: the weight the quantized model will compute with."""
        return dequantize(self.spec, *self.quantize(weight))


def default_spec(method: str, widths: Sequence[int] = (), group_size: int | None = None,
                 zero_point: bool = False) -> QuantSpec:
    """The spec for a model whose quantized layers have these input widths: the group size given, or the
    method's default that divides them all; w2 always has a zero-point."""
    if group_size is None and method in DEFAULT_GROUPS:
        candidates = DEFAULT_GROUPS[method]
        group_size = next((g for g in candidates if all(w % g == 0 for w in widths)), candidates[-1])
    return QuantSpec(method, group_size, zero_point or method == "w2")
