"""A float copy of a tokenmill quantized checkpoint: every `<layer>.qweight/.scales/.qzeros` triple dequantized
back into `<layer>.weight`. The model it loads computes exactly what the quantized model stands for, so it is the
reference for the quantized methods and lets accuracy be measured before a method's kernels exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenmill.errors import ModelLoadError
from tokenmill.quant.codes import QuantSpec, dequantize

_SUFFIXES = (".qweight", ".scales", ".qzeros")


def dequantized_tensors(folder: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" not in config:
        raise ModelLoadError(f"{folder}/config.json: no quantization_config; not a quantized checkpoint")
    spec = QuantSpec.from_config(config["quantization_config"])
    raw: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                raw[name] = handle.get_tensor(name)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith(".qweight"):
            layer = name[: -len(".qweight")]
            if f"{layer}.scales" not in raw:
                raise ModelLoadError(f"{folder}: {name} has no {layer}.scales")
            weight = dequantize(spec, tensor, raw[f"{layer}.scales"], raw.get(f"{layer}.qzeros"))
            out[f"{layer}.weight"] = weight.to(dtype)
        elif not name.endswith(_SUFFIXES):
            out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def write_dequantized_copy(folder: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the float twin of a quantized checkpoint folder (same tokenizer files, no quantization_config)."""
    folder, out = Path(folder), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dequantized_tensors(folder, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for file in folder.iterdir():
        if file.is_file() and file.name != "config.json" and not file.name.endswith(".safetensors"):
            shutil.copy2(file, out / file.name)
    return out
