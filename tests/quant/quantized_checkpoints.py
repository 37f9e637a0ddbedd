"""Checkpoints for quantization tests, made from a float one: a tokenmill quantized copy (canonical tensors
and a quantization_config) and a float copy whose linear weights are the dequantized codes, which a
quantized model must reproduce."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokenmill.quant.codes import QuantSpec, dequantize, quantize_rtn

_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def is_quantized_linear(name: str) -> bool:
    """The checkpoint tensors tokenmill quantizes: decoder linear weights, not embeddings, the head, norms or
    MoE experts and routers."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") and ".experts." not in name


def _copy_side_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def write_quantized_copy(src: str | Path, out_dir: str | Path, spec: QuantSpec) -> Path:
    src, out = Path(src), Path(out_dir)
    _copy_side_files(src, out)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(src / "model.safetensors").items():
        if not is_quantized_linear(name):
            tensors[name] = tensor
            continue
        layer = name.removesuffix(".weight")
        qweight, scales, qzeros = quantize_rtn(spec, tensor)
        tensors[f"{layer}.qweight"], tensors[f"{layer}.scales"] = qweight, scales
        if qzeros is not None:
            tensors[f"{layer}.qzeros"] = qzeros
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = spec.to_config()
    (out / "config.json").write_text(json.dumps(config))
    return out


def write_dequantized_copy(src: str | Path, out_dir: str | Path, spec: QuantSpec, head: bool = False) -> Path:
    """With `head`, the LM head too (the `:head` option): a tied head becomes an untied dequantized copy of the
    embedding, which itself stays float."""
    src, out = Path(src), Path(out_dir)
    _copy_side_files(src, out)
    tensors = load_file(src / "model.safetensors")
    for name, tensor in tensors.items():
        if is_quantized_linear(name):
            tensors[name] = dequantize(spec, *quantize_rtn(spec, tensor)).to(tensor.dtype)
    if head:
        float_head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
        tensors["lm_head.weight"] = dequantize(spec, *quantize_rtn(spec, float_head)).to(float_head.dtype)
        config = json.loads((out / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
