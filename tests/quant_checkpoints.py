"""Quantized checkpoints in other people's formats, for tests: packed here with the formats' published layouts
(AutoGPTQ's and AutoAWQ's packers, compressed-tensors' pack_to_int32), written loop by loop from the format
descriptions rather than with tokenmill's unpackers, so a converter that reads them wrong fails.

A layer is given as random canonical parts: codes [out, in] (0..2^bits-1), scales and zeros [out, groups];
`expected_weight` is what they stand for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: bit field f of a word holds column 8c + order[f]


class Layer(NamedTuple):
    codes: np.ndarray  # [out, in] unsigned codes
    scales: np.ndarray  # [out, groups] float32 (float16-representable)
    zeros: np.ndarray  # [out, groups] integer zero-points


def random_layer(out: int, width: int, group: int, bits: int, rng: np.random.Generator, symmetric: bool) -> Layer:
    top = (1 << bits) - 1
    groups = width // group
    codes = rng.integers(0, top + 1, size=(out, width))
    scales = (rng.random((out, groups)) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    zeros = np.full((out, groups), 1 << (bits - 1)) if symmetric else rng.integers(0, top + 1, size=(out, groups))
    return Layer(codes, scales, zeros)


def expected_weight(layer: Layer) -> torch.Tensor:
    """W = (code - zero) * scale per group, in float32 (the canonical formula, computed the same way)."""
    out, width = layer.codes.shape
    groups = layer.scales.shape[1]
    codes = torch.from_numpy(layer.codes).float().reshape(out, groups, -1)
    grouped = codes - torch.from_numpy(layer.zeros).float().unsqueeze(-1)
    return (grouped * torch.from_numpy(layer.scales).unsqueeze(-1)).reshape(out, width)


def _words(fields: np.ndarray, bits: int) -> np.ndarray:
    """[..., n, 32 / bits] unsigned values -> [..., n] int32 words, value j at bits j * bits."""
    word = np.zeros(fields.shape[:-1], dtype=np.uint32)
    for j in range(fields.shape[-1]):
        word |= fields[..., j].astype(np.uint32) << np.uint32(j * bits)
    return word.view(np.int32)


def gptq_tensors(layer: Layer, bits: int, group: int, v1: bool = True,
                 g_idx: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """AutoGPTQ's layout: qweight [in / p, out] packed along the input, qzeros [groups, out / p] along the
    output, zeros stored minus one in v1 ("gptq"), scales [groups, out] float16, g_idx [in]."""
    per = 32 // bits
    out, width = layer.codes.shape
    intweight = layer.codes.T  # [in, out]
    qweight = np.zeros((width // per, out), dtype=np.uint32)
    for row in range(width // per):
        for k in range(per):
            qweight[row] |= intweight[row * per + k].astype(np.uint32) << np.uint32(bits * k)
    zeros = layer.zeros.T.astype(np.int64)  # [groups, out]
    if v1:
        zeros = (zeros - 1) & ((1 << bits) - 1)
    qzeros = _words(zeros.reshape(zeros.shape[0], out // per, per), bits)
    g = np.arange(width) // group if g_idx is None else g_idx
    return {"qweight": torch.from_numpy(qweight.view(np.int32)), "qzeros": torch.from_numpy(qzeros),
            "scales": torch.from_numpy(layer.scales.T.copy()).half(), "g_idx": torch.from_numpy(g.astype(np.int32))}


def awq_tensors(layer: Layer) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM layout: qweight [in, out / 8] and qzeros [groups, out / 8] packed along the output in
    the interleaved order, scales [groups, out] float16."""
    def pack(values: np.ndarray) -> np.ndarray:  # [rows, out] -> [rows, out / 8]
        packed = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
        for col in range(values.shape[1] // 8):
            for field in range(8):
                packed[:, col] |= values[:, col * 8 + AWQ_PACK_ORDER[field]].astype(np.uint32) << np.uint32(4 * field)
        return packed.view(np.int32)

    return {"qweight": torch.from_numpy(pack(layer.codes.T)), "qzeros": torch.from_numpy(pack(layer.zeros.T)),
            "scales": torch.from_numpy(layer.scales.T.copy()).half()}


def ct_pack_tensors(layer: Layer, bits: int, symmetric: bool,
                    zero_point_packed: bool = True) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: signed q = code - 2^(bits-1), stored +2^(bits-1) (the code), packed
    along the input [out, in / p]; asymmetric zero-points signed, packed along the output [out / p, groups]."""
    per = 32 // bits
    out, width = layer.codes.shape
    tensors = {"weight_packed": torch.from_numpy(_words(layer.codes.reshape(out, width // per, per), bits)),
               "weight_scale": torch.from_numpy(layer.scales.copy()).half(),
               "weight_shape": torch.tensor([out, width], dtype=torch.int64)}
    if not symmetric:
        if zero_point_packed:
            stored = layer.zeros.T.reshape(layer.zeros.shape[1], out // per, per)  # [groups, out / p, p]
            tensors["weight_zero_point"] = torch.from_numpy(_words(stored, bits).T.copy())
        else:  # older files: signed, unpacked
            tensors["weight_zero_point"] = torch.from_numpy((layer.zeros - (1 << (bits - 1))).astype(np.int8))
    return tensors


def write_quantized_checkpoint(src: Path, out_dir: Path, quantization_config: dict,
                               layer_tensors, seed: int = 0) -> tuple[Path, Path]:
    """From a float checkpoint folder: `out_dir/quantized` with every linear layer replaced by
    `layer_tensors(name, out, in, rng) -> (stored tensors by leaf, expected float weight)`, and
    `out_dir/reference` with those expected weights in float32 (the model the quantized one must equal)."""
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(seed)
    quantized, reference = out_dir / "quantized", out_dir / "reference"
    for folder in (quantized, reference):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, folder / name)
    floats = load_file(src / "model.safetensors")
    packed: dict[str, torch.Tensor] = {}
    for name, tensor in floats.items():
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer.endswith(LINEAR):
            stored, expected = layer_tensors(layer, tensor.shape[0], tensor.shape[1], rng)
            packed.update({f"{layer}.{k}": v.contiguous() for k, v in stored.items()})
            floats[name] = expected
        else:
            packed[name] = tensor
    save_file(floats, reference / "model.safetensors", metadata={"format": "pt"})
    save_file(packed, quantized / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (quantized / "config.json").write_text(json.dumps(config))
    return quantized, reference
