"""AWQ checkpoints (AutoAWQ, GEMM version): config.json quantization_config quant_method "awq".

Per linear layer, input width I, output width O, groups G (4-bit, 8 values per int32 word):
  qweight int32 [I, O / 8]   packed along the output, interleaved: bit field f of a word holds output
                             column 8 * c + [0, 2, 4, 6, 1, 3, 5, 7][f]
  qzeros  int32 [G, O / 8]   packed the same way
  scales  fp16  [G, O]
  W[o, i] = (q[i, o] - z[i // group, o]) * s[i // group, o]

Only the GEMM layout with zero-points is read; the GEMV / Marlin layouts and zero_point=false are refused.
"""

from __future__ import annotations

import torch

from tokenmill.errors import ConfigError
from tokenmill.quant.codes import pack_codes
from tokenmill.quant.formats.base import (CanonicalWeight, group_count, CheckpointFormat, config_int, group_spec, need_int32,
                                          need_shape, unpack_int32)

_SETTING = "quantization_config"
# Output column 8c + j sits in bit field _FIELD_OF_COLUMN[j] of word c (the inverse of AWQ's pack order
# [0, 2, 4, 6, 1, 3, 5, 7], which writes column order[f] into field f).
_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_FIELD_OF_COLUMN = tuple(_PACK_ORDER.index(j) for j in range(8))


class AWQFormat(CheckpointFormat):
    name = "awq"
    marker = "qweight"
    leaves = ("qweight", "qzeros", "scales")
    required = leaves

    def __init__(self, entry: dict) -> None:
        config_int(entry, "bits", f"{_SETTING}.bits", (4,))
        group_size = config_int(entry, "group_size", f"{_SETTING}.group_size")
        version = str(entry.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"{_SETTING}.version", f"AWQ layout {version!r} is not supported (supported: gemm)")
        if not entry.get("zero_point", True):
            raise ConfigError(f"{_SETTING}.zero_point", "AWQ without zero-points is not supported")
        self.spec = group_spec("int4", group_size, True, f"{_SETTING}.group_size")

    def convert(self, layer: str, parts: dict[str, torch.Tensor]) -> CanonicalWeight:
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        need_int32(layer, "qweight", qweight)
        need_int32(layer, "qzeros", qzeros)
        width, out = qweight.shape[0], qweight.shape[1] * 8
        _, groups = group_count(f"{layer}.qweight", width, self.spec.group_size)
        need_shape(layer, "scales", scales, (groups, out), f"[groups, output] for input {width}, output {out}")
        need_shape(layer, "qzeros", qzeros, (groups, out // 8), "[groups, output / 8]")
        codes = unpack_int32(qweight, 4, dim=1, fields=_FIELD_OF_COLUMN).t()
        zeros = unpack_int32(qzeros, 4, dim=1, fields=_FIELD_OF_COLUMN).t().float().contiguous()
        return CanonicalWeight(pack_codes(codes, 4), scales.t().float().contiguous(), zeros)
