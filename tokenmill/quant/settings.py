"""The `quantization` engine setting: which method to quantize a float checkpoint with on load, and how the
setting meets a checkpoint that is quantized already.

Spelling: METHOD[:gN][:sym][:head], e.g. "int8", "int4", "int4:g32", "w2:g64", "int4:g128:sym"; or "none": load
a quantized checkpoint dequantized, as a float model (the reference its quantized runs are compared with).
Defaults (RTN on load): int8 and fp8 per output channel; int4 and w2 in groups of 64 with a zero-point. Group 64 rather than
128 because it divides the widths of small models (SmolLM2's hidden size 576 is 4.5 groups of 128) as well
as every multiple of 128; a zero-point because round-to-nearest with one fits the weights' range better
than a symmetric grid at the same cost in the kernels. `:head` quantizes the LM head too (RTN, the same
scheme, after loading; quant/lm_head.py), which the default leaves in float; it is the only option that
also applies to a quantized checkpoint, whose own scheme the head then takes.
"""

from __future__ import annotations

from tokenmill.errors import ConfigError
from tokenmill.quant.codes import METHODS, QuantSpec

NONE = "none"
HEAD = "head"
DEFAULT_GROUP_SIZE = {"int4": 64, "w2": 64}
_ZERO_POINT_BY_DEFAULT = ("int4", "w2")


def parse_quantization(value: str) -> QuantSpec | None:
    """The QuantSpec a `quantization` setting asks for (None for "none"); ConfigError("quantization", ...) when
    malformed."""
    if not isinstance(value, str) or not value:
        raise ConfigError("quantization", f"must be {NONE} or one of {', '.join(METHODS)} (optionally :gN, :sym), "
                                          f"got {value!r}")
    if value.strip().lower() == NONE:
        return None
    method, *options = value.strip().lower().split(":")
    if method not in METHODS:
        raise ConfigError("quantization", f"unknown method {method!r} (one of {', '.join(METHODS)})")
    group = DEFAULT_GROUP_SIZE.get(method)
    zero_point = method in _ZERO_POINT_BY_DEFAULT
    for option in options:
        if option == HEAD:
            continue  # which layers, not how: quantizes_lm_head
        if option == "sym":
            zero_point = False
        elif option.startswith("g") and option[1:].isdigit():
            group = int(option[1:])
        else:
            raise ConfigError("quantization", f"unknown option {option!r} in {value!r} (use :gN for a group "
                                              "size, :sym for no zero-point, :head to quantize the LM head too)")
    return QuantSpec(method, group, zero_point)  # its own checks name quantization.group_size etc.


def quantizes_lm_head(value: str | None) -> bool:
    """Whether a `quantization` setting asks for the LM head quantized too (its `:head` option)."""
    return value is not None and HEAD in value.strip().lower().split(":")[1:]


def resolve_quant_spec(requested: str | None, checkpoint: QuantSpec | None) -> tuple[QuantSpec | None, bool]:
    """(the spec the model loads with, whether it is a float checkpoint's to quantize while loading).

    A quantized checkpoint loads as it is, or dequantized with "none"; asking for another method than it has
    is an error, since re-quantizing quantized weights would only lose more."""
    asked = None if requested is None else parse_quantization(requested)
    if checkpoint is None:
        return asked, asked is not None
    if requested is None:
        return checkpoint, False
    if asked is None:  # "none": the loader dequantizes the checkpoint for a float model
        return None, False
    scheme_given = any(option != HEAD for option in requested.strip().lower().split(":")[1:])
    if asked.method != checkpoint.method or (scheme_given and asked != checkpoint):
        raise ConfigError("quantization", f"{requested!r} was asked for, but the checkpoint is quantized as "
                                          f"{_spelling(checkpoint)}; leave quantization unset to load it as that, "
                                          f"or set it to {NONE!r} to load it dequantized")
    return checkpoint, False


def _spelling(spec: QuantSpec) -> str:
    parts = [spec.method]
    if spec.group_size is not None:
        parts.append(f"g{spec.group_size}")
    if spec.method in _ZERO_POINT_BY_DEFAULT and not spec.zero_point:
        parts.append("sym")
    return ":".join(parts)
