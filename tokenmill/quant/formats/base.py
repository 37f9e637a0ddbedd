"""What every foreign checkpoint format converts into, and the int32 bit-unpacking they share.

A `CheckpointFormat` is read from a config.json `quantization_config`; it knows its `QuantSpec`, which
tensor leaves one quantized linear layer stores (`<layer>.<leaf>`), and how to turn those into the canonical
tensors of quant/codes.py. Conversions are pure functions of the tensors, so they are tested without a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.quant.codes import QuantSpec


class CanonicalWeight(NamedTuple):
    """One linear layer in the canonical layout: W = (code - qzeros) * scales, per group, rows first."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None


class CheckpointFormat(ABC):
    """One quantized checkpoint format, as its config describes it."""

    name: str
    spec: QuantSpec
    marker: str  # the leaf that only a quantized layer has: its presence makes a layer this format's
    leaves: tuple[str, ...]  # every leaf a quantized layer may store (those beyond `required` are optional)
    required: tuple[str, ...]

    @abstractmethod
    def convert(self, layer: str, parts: dict[str, torch.Tensor]) -> CanonicalWeight:
        """The layer's stored tensors (by leaf) -> canonical tensors; ModelLoadError names the tensor at fault."""


def unpack_int32(words: torch.Tensor, bits: int, dim: int, fields: Sequence[int] | None = None) -> torch.Tensor:
    """Split every int32 of `words` along `dim` into 32 / bits unsigned values (int32), in place of the word.

    Value j of a word is bit field fields[j] (bits fields[j] * bits and up); fields defaults to 0, 1, 2, ...
    (value j at the j-th lowest bits, as GPTQ and compressed-tensors pack), AWQ interleaves them."""
    per_word = 32 // bits
    fields = list(range(per_word)) if fields is None else list(fields)
    shifts = torch.tensor([f * bits for f in fields], dtype=torch.int64)
    last = words.movedim(dim, -1).to(torch.int64)  # sign-extended: the low 32 bits are the stored pattern
    values = (last.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*last.shape[:-1], -1).movedim(-1, dim).to(torch.int32).contiguous()


def need_int32(layer: str, leaf: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int32:
        raise ModelLoadError(f"tensor {layer}.{leaf}: expected int32 packed words, got {tensor.dtype}")


def need_shape(layer: str, leaf: str, tensor: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ModelLoadError(f"tensor {layer}.{leaf}: shape {tuple(tensor.shape)}, expected {shape} ({why})")


def group_count(tensor_name: str, width: int, group_size: int | None) -> tuple[int, int]:
    """(group, groups) of a layer `width` wide: per-channel (one group) when group_size is None."""
    group = group_size or width
    if width % group:
        raise ModelLoadError(f"tensor {tensor_name}: input width {width} is not a multiple of the group size {group}")
    return group, width // group


def need_trivial_g_idx(layer: str, leaf: str, g_idx: torch.Tensor | None, width: int, group: int) -> None:
    """Act-order checkpoints assign input columns to groups out of order (g_idx); the canonical layout has
    contiguous groups and no activation permutation, so only the identity assignment is accepted."""
    if g_idx is None:
        return
    expected = torch.arange(width, dtype=torch.int64) // group
    if g_idx.numel() != width or not torch.equal(g_idx.reshape(-1).to(torch.int64), expected):
        raise ModelLoadError(f"tensor {layer}.{leaf}: input columns are assigned to groups out of order "
                             "(act-order / desc_act); tokenmill loads only checkpoints quantized without act-order")


def config_int(entry: dict, key: str, setting: str, allowed: Sequence[int] | None = None) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(setting, f"expected an integer, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ConfigError(setting, f"{value} is not supported (supported: {', '.join(map(str, allowed))})")
    return value


def group_spec(method: str, group_size: int, zero_point: bool, setting: str) -> QuantSpec:
    """The spec of a format's group size, where -1 means one scale per output channel (int8 only)."""
    if group_size == -1:
        if method != "int8":
            raise ConfigError(setting, f"-1 (one group per output channel) is not supported for {method}; "
                                       "tokenmill's int4 takes group sizes that are multiples of 8")
        return QuantSpec("int8", None, False)
    try:
        return QuantSpec(method, group_size, zero_point)
    except ConfigError as exc:
        raise ConfigError(setting, exc.message) from exc
