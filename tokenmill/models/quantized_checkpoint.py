"""Quantized checkpoints (GPTQ, AWQ, compressed-tensors, tokenmill's own) as a transform over the loader's
tensor stream: each quantized layer's stored tensors become the canonical <layer>.qweight / .scales /
.qzeros of quant/codes.py, or, for a model built without quantization, one dequantized <layer>.weight.

The conversion itself is the format's (quant/formats/); here only the names: which layers are quantized (those
with the format's marker tensor), which of their tensors to gather, and what to hand the weight filler.
Tensors are still read lazily, one layer at a time, when the filler reaches them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.models.loader import NamedTensor
from tokenmill.quant.codes import QuantSpec, dequantize
from tokenmill.quant.formats import CheckpointFormat, checkpoint_format


def split_reader(where: str, layer: str, leaves: list[str],
                 convert: Callable[[], dict[str, torch.Tensor]]) -> list[NamedTensor]:
    """NamedTensors <layer>.<leaf> sharing one conversion, run when the first is read; each part is handed
    out once and then dropped, so a converted layer lives only while the filler copies it."""
    pending: dict[str, torch.Tensor] = {}

    def part(leaf: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            if leaf not in pending:
                pending.clear()
                pending.update(convert())
            return pending.pop(leaf)

        return read

    return [NamedTensor(where, f"{layer}.{leaf}", part(leaf)) for leaf in leaves]


def canonical_leaves(spec: QuantSpec) -> list[str]:
    """The tensors one linear layer of `spec` stores (quant/codes.py): zero-points for the packed methods."""
    return ["qweight", "scales"] + (["qzeros"] if spec.method in ("int4", "w2") else [])


def describe(spec: QuantSpec) -> str:
    group = f" g{spec.group_size}" if spec.group_size else " per channel"
    return f"{spec.method}{group}{' with zero-points' if spec.zero_point else ''}"


def quantized_checkpoint_tensors(tensors: list[NamedTensor], config: dict[str, Any],
                                 spec: QuantSpec | None) -> list[NamedTensor]:
    """The checkpoint's tensors with every quantized layer converted: to `spec`'s canonical tensors, or
    dequantized to <layer>.weight when `spec` is None. Unquantized checkpoints pass unchanged."""
    entry = config.get("quantization_config")
    fmt = checkpoint_format(entry) if isinstance(entry, dict) else None
    if fmt is None:
        return tensors
    if spec is not None and spec != fmt.spec:
        raise ConfigError("quantization", f"the checkpoint is {fmt.name} {describe(fmt.spec)}; it loads as that "
                                          f"or dequantized ('none'), not as {describe(spec)}")
    by_name = {t.name: t for t in tensors}
    suffix = "." + fmt.marker
    layers = {t.name[: -len(suffix)] for t in tensors if t.name.endswith(suffix)}
    out: list[NamedTensor] = []
    done: set[str] = set()
    for tensor in tensors:
        layer, _, leaf = tensor.name.rpartition(".")
        if layer not in layers or leaf not in fmt.leaves:
            out.append(tensor)
        elif layer not in done:
            done.add(layer)
            stored = {leaf: by_name[f"{layer}.{leaf}"] for leaf in fmt.leaves if f"{layer}.{leaf}" in by_name}
            missing = [leaf for leaf in fmt.required if leaf not in stored]
            if missing:
                raise ModelLoadError(f"{tensor.where}: quantized layer {layer} lacks "
                                     f"{', '.join(f'{layer}.{m}' for m in missing)} ({fmt.name} format)")
            out.extend(_layer_tensors(fmt, layer, stored, spec))
    return out


def _layer_tensors(fmt: CheckpointFormat, layer: str, stored: dict[str, NamedTensor],
                   spec: QuantSpec | None) -> list[NamedTensor]:
    where = stored[fmt.marker].where

    def convert() -> dict[str, torch.Tensor]:
        try:
            canonical = fmt.convert(layer, {leaf: t.read() for leaf, t in stored.items()})
        except ModelLoadError as exc:
            raise ModelLoadError(f"{where}: {exc}") from exc
        if spec is None:
            return {"weight": dequantize(fmt.spec, *canonical)}
        parts = {"qweight": canonical.qweight, "scales": canonical.scales}
        if canonical.qzeros is not None:
            parts["qzeros"] = canonical.qzeros
        return parts

    return split_reader(where, layer, ["weight"] if spec is None else canonical_leaves(spec), convert)
