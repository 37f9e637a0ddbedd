"""tokenmill's own quantized checkpoints (quantization_config quant_method "tokenmill"): already canonical.

Read through the same transform as the foreign formats so that a model built without quantization ('none')
gets them dequantized, and so a quantized one gets them checked: dtype, and shapes that agree with each other
and with the spec (the width follows from qweight's columns, the groups from the width).
"""

from __future__ import annotations

import torch

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.formats.base import CanonicalWeight, CheckpointFormat, need_shape


class TokenmillFormat(CheckpointFormat):
    name = "tokenmill"
    marker = "qweight"
    leaves = ("qweight", "scales", "qzeros")
    required = ("qweight", "scales")

    def __init__(self, entry: dict) -> None:
        self.spec = QuantSpec.from_config(entry)

    def convert(self, layer: str, parts: dict[str, torch.Tensor]) -> CanonicalWeight:
        spec, qweight, scales = self.spec, parts["qweight"], parts["scales"]
        if qweight.dtype != spec.qweight_dtype() or qweight.dim() != 2:
            raise ModelLoadError(f"tensor {layer}.qweight: expected {spec.qweight_dtype()} [output, input / "
                                 f"{spec.codes_per_byte}] for {spec.method}, got {qweight.dtype} "
                                 f"{tuple(qweight.shape)}")
        out, width = qweight.shape[0], qweight.shape[1] * spec.codes_per_byte
        try:
            groups = spec.groups(width)
        except ConfigError as exc:
            raise ModelLoadError(f"tensor {layer}.qweight: {exc}") from exc
        need_shape(layer, "scales", scales, (out, groups), f"[output, groups] for input {width}")
        qzeros = parts.get("qzeros")
        if spec.method in ("int4", "w2"):
            if qzeros is None:
                raise ModelLoadError(f"tensor {layer}.qzeros: missing ({spec.method} stores zero-points)")
            need_shape(layer, "qzeros", qzeros, (out, groups), f"[output, groups] for input {width}")
            qzeros = qzeros.float()
        return CanonicalWeight(qweight, scales.float(), qzeros)
