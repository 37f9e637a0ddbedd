"""The canonical quantized weight: what a tokenmill quantized checkpoint stores and every loader produces.

One linear layer's weight W [out, in] is stored as integer codes with per-group scales and zero-points,
rows first (output channels), so a fused layer's shards are row ranges of every tensor as for float weights:

  int8  qweight int8  [out, in]          codes -128..127   scales [out, 1] or [out, in / group] (symmetric)
  int4  qweight uint8 [out, in / 2]      codes 0..15       scales, qzeros [out, in / group]
  w2    qweight uint8 [out, in / 4]      codes 0..3        scales, qzeros [out, in / group]
  fp8   qweight float8_e4m3fn [out, in]                    scales [out, 1]

  W[o, i] = (code[o, i] - qzeros[o, i // group]) * scales[o, i // group]      (qzeros = 0 where absent)

Packing puts column c of a byte's group at bits (c % per_byte) * bits: int4's even column in the low nibble.
Scales and zero-points are float32; a zero-point may be fractional (the 2-bit alternating fit solves it in
closed form), integer zero-points are just a special case. A method repacks these into its kernel's layout
after loading; checkpoints never hold a kernel layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.errors import ConfigError

METHODS = ("int8", "int4", "w2", "fp8")
_BITS = {"int8": 8, "int4": 4, "w2": 2, "fp8": 8}
_GROUPED = {"int4", "w2"}  # packed several codes to a byte; a group size is required
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass(frozen=True)
class QuantSpec:
    """How one model's linear weights are quantized. `group_size` is None for per-output-channel scales."""

    method: str
    group_size: int | None = None
    zero_point: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("quantization", f"unknown method {self.method!r} (one of {', '.join(METHODS)})")
        # int8 may be grouped too (GGUF Q8_0 is int8 in groups of 32); fp8 is per channel only.
        needs_group = self.method in _GROUPED
        if self.group_size is not None or needs_group:
            if self.method == "fp8" or self.group_size is None or self.group_size < 8 or self.group_size % 8:
                raise ConfigError("quantization.group_size",
                                  f"{self.method} takes " + ("no group size" if self.method == "fp8" else
                                  f"a group size that is a multiple of 8") + f", got {self.group_size}")
        if self.zero_point and self.method in ("int8", "fp8"):
            raise ConfigError("quantization.zero_point", f"{self.method} is symmetric; no zero-point")

    @property
    def bits(self) -> int:
        return _BITS[self.method]

    @property
    def has_qzeros(self) -> bool:
        """Whether the stored weight carries qzeros: the packed methods always do (symmetric ones hold the
        midpoint), int8 and fp8 never."""
        return self.method in _GROUPED

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits if self.method in _GROUPED else 1

    def groups(self, input_size: int) -> int:
        """Scale columns for a layer of this input width; refuses widths the group does not divide."""
        if self.group_size is None:
            return 1
        if input_size % self.group_size:
            raise ConfigError("quantization.group_size",
                              f"group size {self.group_size} does not divide the layer width {input_size}")
        return input_size // self.group_size

    def qweight_shape(self, output_size: int, input_size: int) -> tuple[int, int]:
        self.groups(input_size)
        return output_size, input_size // self.codes_per_byte

    def qweight_dtype(self) -> torch.dtype:
        return {"int8": torch.int8, "fp8": torch.float8_e4m3fn}.get(self.method, torch.uint8)

    def to_config(self) -> dict:
        """The `quantization_config` entry of a tokenmill checkpoint's config.json."""
        return {"quant_method": "tokenmill", "method": self.method, "group_size": self.group_size,
                "zero_point": self.zero_point}

    @staticmethod
    def from_config(entry: dict) -> QuantSpec:
        if entry.get("quant_method") != "tokenmill":
            raise ConfigError("quantization_config.quant_method",
                              f"{entry.get('quant_method')!r} is not a tokenmill checkpoint's")
        return QuantSpec(str(entry.get("method")), entry.get("group_size"), bool(entry.get("zero_point", False)))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, in] codes 0..2^bits-1 (any integer dtype) -> uint8 [out, in * bits / 8]."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"width {codes.shape[-1]} is not a multiple of {per_byte}")
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = torch.zeros(grouped.shape[:-1], dtype=torch.uint8, device=codes.device)
    for k in range(per_byte):
        packed |= grouped[..., k] << (k * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [out, n] -> uint8 codes [out, n * 8 / bits]; the inverse of pack_codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (k * bits)) & mask for k in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)


def codes_of(spec: QuantSpec, qweight: torch.Tensor) -> torch.Tensor:
    """The integer (or fp8) codes of a stored qweight, unpacked to [out, in]."""
    return unpack_codes(qweight, spec.bits) if spec.method in _GROUPED else qweight


def dequantize(spec: QuantSpec, qweight: torch.Tensor, scales: torch.Tensor,
               qzeros: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight [out, in] the stored tensors stand for (the twin every kernel is checked against)."""
    codes = codes_of(spec, qweight).float()
    out, width = codes.shape
    groups = scales.shape[-1]
    grouped = codes.reshape(out, groups, width // groups)
    if qzeros is not None:
        grouped = grouped - qzeros.float().unsqueeze(-1)
    return (grouped * scales.float().unsqueeze(-1)).reshape(out, width)


def quantize_rtn(spec: QuantSpec, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest: float [out, in] -> (qweight, scales, qzeros or None) in the canonical layout."""
    w = weight.detach().float()
    out, width = w.shape
    groups = spec.groups(width)
    grouped = w.reshape(out, groups, width // groups)
    if spec.method in ("int8", "fp8"):
        top = 127.0 if spec.method == "int8" else FP8_MAX
        scales = (grouped.abs().amax(-1) / top).clamp(min=1e-12)
        scaled = (grouped / scales.unsqueeze(-1)).reshape(out, width)
        if spec.method == "int8":
            return torch.round(scaled).clamp(-128, 127).to(torch.int8), scales, None
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales, None
    top = (1 << spec.bits) - 1
    if spec.zero_point:
        low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
        scales = ((high - low) / top).clamp(min=1e-12)
        zeros = torch.round(-low / scales).clamp(0, top)
    else:
        mid = (top + 1) // 2  # codes 0..top around mid: int4 -8..7, w2 -2..1
        scales = (grouped.abs().amax(-1) / mid).clamp(min=1e-12)
        zeros = torch.full_like(scales, float(mid))
    codes = torch.round(grouped / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, top)
    return pack_codes(codes.reshape(out, width), spec.bits), scales, zeros
