"""GGUF linear weights -> tokenmill's canonical quantized weight (quant/codes.py), without going through floats.

A GGUF block is a group of 32 (or a 256-element super-block of eight 32-groups) with its own scale, so the
common block types are already group-wise weights; repacking keeps their exact values:

  Q8_0  W = d * q                 -> int8 g32:  codes q, scale d
  Q4_0  W = d * (q - 8)           -> int4 g32:  codes q, scale d, zero 8
  Q4_1  W = d * q + m             -> int4 g32 with zero-points: codes q, scale d, zero -m / d
  Q4_K  W = (d * sc) * q - dmin * mn, per 32-element sub-block -> the same, scale d * sc, zero dmin * mn / scale

A block whose scale is 0 holds one value for all 32 elements (m, or -dmin * mn): it becomes codes 0, scale 1,
zero -value, which stands for it exactly. Linear tensors of any other type (K-quants other than Q4_K, F16)
are dequantized and re-quantized round-to-nearest into the model's spec; the file's spec is decided from
the types of its linear layers (`gguf_quant_entry`), and embeddings and the LM head always load as floats.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from tokenmill.models.gguf.dequant import dequantize, q4_0_parts, q4_1_parts, q4_k_parts, q8_0_parts
from tokenmill.models.gguf.ggml_types import GGML_TYPES, type_name
from tokenmill.models.gguf.reader import GGUFFile, TensorInfo
from tokenmill.quant.codes import QuantSpec, pack_codes, quantize_rtn

# The per-layer tensors that are linear layers' weights (llama.cpp names); everything else stays float.
LINEAR_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_GROUP = 32
_FLOAT_TYPES = ("F32", "F16", "BF16")
_INT4_TYPES = {"Q4_0": False, "Q4_1": True, "Q4_K": True}  # type -> needs zero-points
# The spec a quantized file gets when none of its linear types repacks exactly (Q5_K, Q6_K...): int8 keeps
# their accuracy where int4 would lose bits.
_FALLBACK = QuantSpec("int8", _GROUP)

Canonical = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (qweight, scales, qzeros or None)


def is_linear_tensor(info: TensorInfo) -> bool:
    """blk.N.<linear part>.weight, a matrix."""
    parts = info.name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR_PARTS and parts[3] == "weight" \
        and len(info.shape) == 2


def gguf_quant_entry(gguf: GGUFFile) -> dict | None:
    """The `quantization_config` of the file's config dict: the spec its linear layers' types map onto (the
    type holding most of their elements decides), or None when they are all floats."""
    elements: Counter[str] = Counter()
    for info in gguf.tensors.values():
        if is_linear_tensor(info):
            elements[type_name(info.type_id)] += info.numel
    quantized = {name: n for name, n in elements.items() if name not in _FLOAT_TYPES}
    if not quantized:
        return None
    int4 = sum(n for name, n in quantized.items() if name in _INT4_TYPES)
    int8 = quantized.get("Q8_0", 0)
    if int4 == 0 and int8 == 0:
        spec = _FALLBACK
    elif int4 >= int8:
        spec = QuantSpec("int4", _GROUP, any(_INT4_TYPES[name] for name in quantized if name in _INT4_TYPES))
    else:
        spec = QuantSpec("int8", _GROUP)
    return {"quant_method": "gguf", "method": spec.method, "group_size": spec.group_size,
            "zero_point": spec.zero_point, "linear_types": dict(sorted(elements.items()))}


def repacks_exactly(type_id: int, spec: QuantSpec) -> bool:
    """Whether tensors of this type become `spec`'s canonical tensors with their values kept."""
    name = type_name(type_id)
    if spec.group_size != _GROUP:
        return False
    if name == "Q8_0":
        return spec.method == "int8"
    if name in _INT4_TYPES:
        return spec.method == "int4" and (spec.zero_point or not _INT4_TYPES[name])
    return False


def canonical_weight(raw: np.ndarray, info: TensorInfo, spec: QuantSpec) -> Canonical:
    """One linear tensor's bytes -> (qweight, scales, qzeros) of `spec`: repacked when its type allows it
    (`repacks_exactly`), else dequantized and quantized round-to-nearest."""
    if not repacks_exactly(info.type_id, spec):
        return quantize_rtn(spec, dequantize(raw, info.type_id, info.shape))
    out, width = info.shape
    known = GGML_TYPES[info.type_id]
    blocks = torch.from_numpy(raw).reshape(-1, known.type_size)
    name = known.name
    if name == "Q8_0":
        d, q = q8_0_parts(blocks)
        return q.reshape(out, width), d.reshape(out, width // _GROUP), None
    if name == "Q4_0":
        d, q = q4_0_parts(blocks)
        scales = d.reshape(out, width // _GROUP)
        return pack_codes(q.reshape(out, width), 4), scales, torch.full_like(scales, 8.0)
    if name == "Q4_1":
        d, m, q = q4_1_parts(blocks)
        scale, offset = d, -m  # W = d * q - (-m)
    else:  # Q4_K: eight 32-element sub-blocks per super-block, each with its own scale and offset
        scale, offset, q = q4_k_parts(blocks)
    codes, scales, zeros = _with_offset(q.reshape(-1, _GROUP), scale.reshape(-1, 1), offset.reshape(-1, 1))
    groups = width // _GROUP
    return pack_codes(codes.reshape(out, width), 4), scales.reshape(out, groups), zeros.reshape(out, groups)


def _with_offset(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Groups W = scale * q - offset -> (codes, scale, zero) with W = (code - zero) * scale. A group whose
    scale is 0 is the constant -offset: codes 0, scale 1, zero offset. (Scales and offsets come from float16
    fields, so offset / scale stays far inside float32's range otherwise.)"""
    constant = scale == 0
    zero = offset / torch.where(constant, torch.ones_like(scale), scale)
    codes = torch.where(constant, torch.zeros_like(q), q)
    return codes, torch.where(constant, torch.ones_like(scale), scale), torch.where(constant, offset, zero)
