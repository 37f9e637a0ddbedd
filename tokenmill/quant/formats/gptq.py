"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum): config.json quantization_config quant_method "gptq".

Per linear layer, for bits b (p = 32 / b values per int32 word), input width I, output width O, groups G:
  qweight int32 [I / p, O]   packed along the input: input row p * r + k is bits k*b.. of word [r, o]
  qzeros  int32 [G, O / p]   packed along the output the same way
  scales  fp16  [G, O]
  g_idx   int32 [I]          the group of every input column (optional)
  W[o, i] = (q[i, o] - z[g, o]) * s[g, o],  g = g_idx[i]

The original format ("gptq", GPTQ v1) stores every zero minus one (the stored field is (z - 1) mod 2^b);
"gptq_v2" stores it as is. Act-order checkpoints (desc_act with a non-identity g_idx) are refused: their
groups are not contiguous. 4-bit loads as int4 (zero-points unless sym); 8-bit only when symmetric (every
zero 128), as int8 codes q - 128.
"""

from __future__ import annotations

import torch

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.quant.codes import pack_codes
from tokenmill.quant.formats.base import (CanonicalWeight, group_count, CheckpointFormat, config_int, group_spec, need_int32,
                                          need_shape, need_trivial_g_idx, unpack_int32)

_SETTING = "quantization_config"


class GPTQFormat(CheckpointFormat):
    name = "gptq"
    marker = "qweight"
    leaves = ("qweight", "qzeros", "scales", "g_idx")
    required = ("qweight", "qzeros", "scales")

    def __init__(self, entry: dict) -> None:
        self.bits = config_int(entry, "bits", f"{_SETTING}.bits", (4, 8))
        group_size = config_int(entry, "group_size", f"{_SETTING}.group_size")
        sym = bool(entry.get("sym", True))
        if self.bits == 8 and not sym:
            raise ConfigError(f"{_SETTING}.sym", "8-bit GPTQ with zero-points is not supported (tokenmill's int8 "
                                                 "is symmetric); only sym=true 8-bit checkpoints load")
        self.spec = group_spec("int4" if self.bits == 4 else "int8", group_size, not sym and self.bits == 4,
                               f"{_SETTING}.group_size")
        version = entry.get("checkpoint_format", entry.get("format", "gptq"))
        if version not in ("gptq", "gptq_v2"):
            raise ConfigError(f"{_SETTING}.checkpoint_format",
                              f"{version!r} is not supported (supported: gptq, gptq_v2)")
        self.zeros_minus_one = version == "gptq"

    def convert(self, layer: str, parts: dict[str, torch.Tensor]) -> CanonicalWeight:
        bits, per_word = self.bits, 32 // self.bits
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        need_int32(layer, "qweight", qweight)
        need_int32(layer, "qzeros", qzeros)
        width, out = qweight.shape[0] * per_word, qweight.shape[1]
        group, groups = group_count(f"{layer}.qweight", width, self.spec.group_size)
        need_shape(layer, "scales", scales, (groups, out), f"[groups, output] for input {width}, output {out}")
        need_shape(layer, "qzeros", qzeros, (groups, -(-out // per_word)), f"[groups, output / {per_word}]")
        need_trivial_g_idx(layer, "g_idx", parts.get("g_idx"), width, group)
        codes = unpack_int32(qweight, bits, dim=0).t()  # [out, in]
        zeros = unpack_int32(qzeros, bits, dim=1)[:, :out]
        if self.zeros_minus_one:
            zeros = (zeros + 1) & ((1 << bits) - 1)
        zeros, scales = zeros.t().float().contiguous(), scales.t().float().contiguous()
        if bits == 4:
            return CanonicalWeight(pack_codes(codes, 4), scales, zeros)
        if not bool((zeros == 128).all()):
            raise ModelLoadError(f"tensor {layer}.qzeros: 8-bit zeros other than 128 (an asymmetric layer); "
                                 "tokenmill's int8 is symmetric")
        return CanonicalWeight((codes - 128).to(torch.int8).contiguous(), scales, None)
