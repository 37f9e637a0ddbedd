"""compressed-tensors checkpoints (llm-compressor): config.json quantization_config quant_method
"compressed-tensors", weight-only schemes in one of three formats.

pack-quantized (int4, or int8): per linear layer, output O, input I, p = 32 / bits values per int32 word,
  weight_packed      int32 [O, I / p]   value i of a row at bits (i % p) * bits of word i // p, stored as
                                        q + 2^(bits-1) (q the signed code, -8..7 for 4 bits)
  weight_scale       [O, G]             (float16 / bfloat16)
  weight_zero_point  [O / p, G] int32   packed along the output the same way (asymmetric only; older
                                        files store it unpacked, signed, [O, G])
  weight_shape       [2] = (O, I)
  weight_g_idx       [I]                (act-order "group" only; refused unless it is the identity)
  W = (q - zp) * scale = (stored - (zp + 2^(bits-1))) * scale: canonical codes are the stored values.
int-quantized (naive-quantized): weight int8 [O, I], signed; symmetric -> int8.
float-quantized: weight float8_e4m3fn [O, I] with a per-channel or per-tensor scale -> fp8 per channel.

Strategies: "group" (group_size), "channel" (int8 / fp8), "tensor" (fp8). Activation quantization in the
scheme is ignored: the weights load as a weight-only method and activations stay in the model dtype.
"""

from __future__ import annotations

import torch

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.quant.codes import QuantSpec, pack_codes
from tokenmill.quant.formats.base import (CanonicalWeight, group_count, CheckpointFormat, group_spec, need_int32, need_shape,
                                          need_trivial_g_idx, unpack_int32)

_SETTING = "quantization_config"
_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")


def _weights_args(entry: dict) -> tuple[dict, str]:
    """The one weights scheme of the config (every group must agree) and the format it is stored in."""
    groups = entry.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{_SETTING}.config_groups", "missing: a compressed-tensors config names its schemes")
    schemes = []
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise ConfigError(f"{_SETTING}.config_groups.{name}.weights", "missing: only weight quantization loads")
        schemes.append((weights, group.get("format") or entry.get("format")))
    if any(s != schemes[0] for s in schemes[1:]):
        raise ConfigError(f"{_SETTING}.config_groups", "layers quantized with different schemes are not supported")
    weights, fmt = schemes[0]
    if fmt not in _FORMATS:
        raise ConfigError(f"{_SETTING}.format", f"{fmt!r} is not supported (supported: {', '.join(_FORMATS)})")
    return weights, fmt


class CompressedTensorsFormat(CheckpointFormat):
    name = "compressed-tensors"

    def __init__(self, entry: dict) -> None:
        weights, self.format = _weights_args(entry)
        self.bits = weights.get("num_bits")
        kind, strategy = weights.get("type", "int"), weights.get("strategy")
        self.symmetric = bool(weights.get("symmetric", True))
        where = f"{_SETTING}.config_groups.weights"
        if self.format == "float-quantized":
            if kind != "float" or self.bits != 8 or strategy not in ("channel", "tensor"):
                raise ConfigError(where, f"float-quantized loads 8-bit float weights per channel or tensor, got "
                                         f"{self.bits}-bit {kind} per {strategy}")
            self.spec = QuantSpec("fp8")
            self.marker = "weight_scale"
            self.leaves = self.required = ("weight", "weight_scale")
            return
        if kind != "int":
            raise ConfigError(f"{where}.type", f"{self.format} stores integer weights, got {kind!r}")
        supported_bits = (4, 8) if self.format == "pack-quantized" else (8,)
        if self.bits not in supported_bits:
            raise ConfigError(f"{where}.num_bits", f"{self.bits} is not supported for {self.format} "
                                                   f"(supported: {', '.join(map(str, supported_bits))})")
        if self.bits == 8 and not self.symmetric:
            raise ConfigError(f"{where}.symmetric", "8-bit weights with zero-points are not supported "
                                                    "(tokenmill's int8 is symmetric)")
        if strategy not in ("group", "channel"):
            raise ConfigError(f"{where}.strategy", f"{strategy!r} is not supported (supported: group, channel)")
        group_size = weights.get("group_size") if strategy == "group" else -1
        if not isinstance(group_size, int):
            raise ConfigError(f"{where}.group_size", f"expected an integer, got {group_size!r}")
        self.spec = group_spec("int4" if self.bits == 4 else "int8", group_size,
                               not self.symmetric, f"{where}.group_size")
        if self.format == "pack-quantized":
            self.marker = "weight_packed"
            self.leaves = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
            self.required = ("weight_packed", "weight_scale", "weight_shape")
        else:
            self.marker = "weight_scale"
            self.leaves = ("weight", "weight_scale", "weight_zero_point")
            self.required = ("weight", "weight_scale")

    def convert(self, layer: str, parts: dict[str, torch.Tensor]) -> CanonicalWeight:
        if self.format == "float-quantized":
            return self._float8(layer, parts)
        if self.format == "pack-quantized":
            out, width = (int(v) for v in parts["weight_shape"].reshape(-1).tolist())
            need_int32(layer, "weight_packed", parts["weight_packed"])
            per_word = 32 // self.bits
            need_shape(layer, "weight_packed", parts["weight_packed"], (out, -(-width // per_word)),
                       f"[output, input / {per_word}] for weight_shape ({out}, {width})")
            codes = unpack_int32(parts["weight_packed"], self.bits, dim=1)[:, :width]
        else:
            codes = parts["weight"]
            if codes.dtype != torch.int8 or codes.dim() != 2:
                raise ModelLoadError(f"tensor {layer}.weight: expected int8 [output, input], got {codes.dtype} "
                                     f"{tuple(codes.shape)}")
            out, width = codes.shape
            codes = codes.to(torch.int32) + 128  # the packed formats' unsigned convention
        group, groups = group_count(layer, width, self.spec.group_size)
        scales = parts["weight_scale"]
        need_shape(layer, "weight_scale", scales, (out, groups), f"[output, groups] for input {width}")
        need_trivial_g_idx(layer, "weight_g_idx", parts.get("weight_g_idx"), width, group)
        scales = scales.float().contiguous()
        if self.bits == 8:
            return CanonicalWeight((codes - 128).to(torch.int8).contiguous(), scales, None)
        offset = 1 << (self.bits - 1)
        zero_point = parts.get("weight_zero_point")
        if zero_point is None:
            zeros = torch.full((out, groups), float(offset))
        elif zero_point.dtype == torch.int32 and zero_point.shape[0] != out:
            need_shape(layer, "weight_zero_point", zero_point, (-(-out // 8), groups), "[output / 8, groups] packed")
            zeros = unpack_int32(zero_point, self.bits, dim=0)[:out].float()
        else:  # stored unpacked: signed zero-points
            need_shape(layer, "weight_zero_point", zero_point, (out, groups), "[output, groups]")
            zeros = zero_point.float() + offset
        return CanonicalWeight(pack_codes(codes, 4), scales, zeros.contiguous())

    def _float8(self, layer: str, parts: dict[str, torch.Tensor]) -> CanonicalWeight:
        weight, scale = parts["weight"], parts["weight_scale"]
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise ModelLoadError(f"tensor {layer}.weight: expected float8_e4m3fn [output, input], got "
                                 f"{weight.dtype} {tuple(weight.shape)}")
        out = weight.shape[0]
        if scale.numel() == 1:  # one scale for the tensor: the same for every channel
            scale = scale.reshape(1, 1).expand(out, 1)
        need_shape(layer, "weight_scale", scale, (out, 1), "[output, 1] per channel, or one per tensor")
        return CanonicalWeight(weight, scale.float().contiguous(), None)
