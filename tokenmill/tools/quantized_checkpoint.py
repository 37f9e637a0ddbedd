"""Write a quantized checkpoint folder: canonical tensors (`<layer>.qweight`, `.scales`, `.qzeros`) under the
checkpoint's own un-fused names (q_proj, k_proj, ..., which the loader fuses again), float tensors for the rest,
config.json with `quantization_config`, and the tokenizer files, so the folder is a complete model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import torch
from safetensors.torch import save_file
from torch import nn

from tokenmill.models.gguf import is_gguf_path
from tokenmill.models.loader import checkpoint_config_dict
from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.weight_quantizer import StoredWeight

# Files of a checkpoint folder that are not weights or config: the tokenizer, chat template, generation defaults.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")
WEIGHTS_FILE = "model.safetensors"


def _checkpoint_parts(model: nn.Module, module_name: str) -> list[tuple[str, slice]]:
    """The checkpoint names of a (possibly fused) linear layer and the rows each one holds."""
    parent, _, leaf = module_name.rpartition(".")
    module = model.get_submodule(module_name)
    packed = getattr(model, "packed_modules", {}).get(leaf)
    if not packed:
        return [(module_name, slice(0, module.output_size))]
    parts = []
    for part, shard in packed:
        offset, size = module.shards[shard]
        parts.append((f"{parent}.{part}" if parent else part, slice(offset, offset + size)))
    return parts


def checkpoint_tensors(model: nn.Module, stored: dict[str, StoredWeight],
                       float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the quantized checkpoint, by name."""
    tensors: dict[str, torch.Tensor] = {}
    quantized_params: set[str] = set()
    for module_name, (qweight, scales, qzeros) in stored.items():
        module = model.get_submodule(module_name)
        quantized_params.update({f"{module_name}.weight", f"{module_name}.bias"})
        for name, rows in _checkpoint_parts(model, module_name):
            tensors[f"{name}.qweight"] = qweight[rows].contiguous()
            tensors[f"{name}.scales"] = scales[rows].contiguous()
            if qzeros is not None:
                tensors[f"{name}.qzeros"] = qzeros[rows].contiguous()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach()[rows].to(float_dtype).contiguous()
    tied = getattr(getattr(model, "lm_head", None), "weight_is_shared", False)
    for name, param in model.named_parameters():
        if name in quantized_params or (tied and name == "lm_head.weight"):
            continue
        tensors[name] = param.detach().to(float_dtype).contiguous()
    return tensors


def _write_tokenizer(model_path: Path, out: Path) -> None:
    if is_gguf_path(model_path):
        from tokenmill.models.gguf.reader import GGUFFile
        from tokenmill.models.gguf.tokenizer import gguf_tokenizer

        backend, config, template = gguf_tokenizer(GGUFFile(model_path))
        backend.save(str(out / "tokenizer.json"))
        config = dict(config)
        if template is not None:
            config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return
    for file in sorted(model_path.iterdir()):
        if file.is_file() and file.name != "config.json" and not file.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(file, out / file.name)


def write_quantized_checkpoint(model_path: str | Path, out_dir: str | Path, model: nn.Module,
                               stored: dict[str, StoredWeight], spec: QuantSpec,
                               float_dtype: torch.dtype) -> Path:
    model_path, out = Path(model_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model, stored, float_dtype)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = checkpoint_config_dict(model_path)  # a GGUF file's: the config its metadata stands for
    config["quantization_config"] = spec.to_config()
    dtype_keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    for key in dtype_keys:  # the float tensors' dtype, under whichever name the source config uses
        config[key] = str(float_dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(model_path, out)
    return out
