"""Load a checkpoint: a folder of safetensors or one GGUF file, streamed one tensor at a time through the
parameters' weight loaders; or random weights for benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import QuantMethod
from tokenmill.models.arch_config import ArchConfig, read_arch_config, read_config_json
from tokenmill.models.gguf import is_gguf_path
from tokenmill.models.registry import model_class_for
from tokenmill.utils.progress import ProgressBar

if TYPE_CHECKING:
    from tokenmill.models.gguf.reader import GGUFFile
    from tokenmill.quant.codes import QuantSpec

# The one table from dtype names (config.DTYPES, less "auto") to torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers some checkpoints carry that the model recomputes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype: torch.dtype | str, arch: ArchConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return TORCH_DTYPES.get(str(arch.torch_dtype).replace("torch.", ""), torch.float32)
    if dtype not in TORCH_DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported (use auto, float32, bfloat16 or float16)")
    return TORCH_DTYPES[dtype]


class NamedTensor(NamedTuple):
    """One checkpoint tensor to load: where it comes from (for errors), its name, and how to read it."""

    where: str
    name: str
    read: Callable[[], torch.Tensor]


def read_checkpoint_arch(model_path: str | Path) -> ArchConfig:
    """The ArchConfig of a checkpoint folder (config.json) or of a GGUF file (its metadata)."""
    return _open_checkpoint(model_path)[0]


def _open_checkpoint(model_path: str | Path) -> tuple[ArchConfig, str, GGUFFile | None]:
    """(architecture, the file that states it, the parsed GGUF file when the checkpoint is one)."""
    if is_gguf_path(model_path):
        from tokenmill.models.gguf.config import gguf_arch_config
        from tokenmill.models.gguf.reader import GGUFFile

        gguf = GGUFFile(model_path)
        return gguf_arch_config(gguf), str(model_path), gguf
    return read_arch_config(model_path), str(Path(model_path) / "config.json"), None


def load_model(
    model_path: str | Path,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    progress: bool = False,
    quant: QuantMethod | None = None,
) -> tuple[nn.Module, ArchConfig]:
    """Build the model for the checkpoint's architecture, fill its weights and ready them for its kernels."""
    arch, source, gguf = _open_checkpoint(model_path)
    model_cls = model_class_for(arch.architecture, source=source)
    torch_dtype = resolve_dtype(dtype, arch)
    device = torch.device(device)
    model = model_cls(arch, torch_dtype, device, quant)
    if load_format == "random":
        init_random_weights(model)
    elif load_format == "auto" and gguf is not None:
        from tokenmill.models.gguf.weights import gguf_tensors, one_thread

        with one_thread():
            fill_weights(model, gguf_tensors(gguf, arch, _quant_spec(quant)), str(model_path), progress)
    elif load_format == "auto":
        from tokenmill.models.quantized_checkpoint import quantized_checkpoint_tensors

        tensors = quantized_checkpoint_tensors(_safetensors_tensors(Path(model_path)),
                                               checkpoint_config_dict(model_path), _quant_spec(quant))
        fill_weights(model, tensors, str(model_path), progress)
    else:
        raise ModelLoadError(f"load_format {load_format!r} is not supported (use auto or random)")
    process_weights_after_loading(model)
    return model.eval(), arch


def _quant_spec(quant: QuantMethod | None) -> QuantSpec | None:
    """The canonical layout the model's quantized layers take (a quant method's `spec`); None: float weights,
    so quantized checkpoints are dequantized as they load."""
    return getattr(quant, "spec", None)


def checkpoint_config_dict(model_path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict, or for a GGUF file the one its metadata stands for (with the
    `quantization_config` its block types map onto): what quant/checkpoint_spec.py reads the spec from."""
    if is_gguf_path(model_path):
        from tokenmill.models.gguf.config import gguf_config_dict
        from tokenmill.models.gguf.reader import GGUFFile

        return gguf_config_dict(GGUFFile(model_path))
    config = read_config_json(model_path)
    legacy = Path(model_path) / "quantize_config.json"  # AutoGPTQ's own file, from before quantization_config
    if "quantization_config" not in config and legacy.is_file():
        try:
            config["quantization_config"] = {"quant_method": "gptq", **json.loads(legacy.read_text())}
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelLoadError(f"{legacy}: not a valid JSON object ({exc})") from exc
    return config


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every layer's quantization method turn the loaded weights into what its kernel runs on."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def init_random_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) matrices, identity norms, zero biases, generated on the model's device."""
    generator_device = next(model.parameters()).device
    generator = torch.Generator(device=generator_device).manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(getattr(modules[name.rpartition(".")[0]], "identity_weight", 1.0))
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)


def _tensor_index(model_path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or by opening the files."""
    index_file = model_path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_file}: not a valid shard index ({exc})") from exc
        missing = {f for f in weight_map.values() if not (model_path / f).is_file()}
        if missing:
            raise ModelLoadError(f"{index_file}: lists shard files that are missing: {', '.join(sorted(missing))}")
        return {name: model_path / f for name, f in weight_map.items()}
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_path}: no *.safetensors weight files found")
    index: dict[str, Path] = {}
    for file in files:
        for name in _open(file).keys():
            index[name] = file
    return index


def _open(file: Path):  # -> safetensors handle
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated / corrupt headers
        raise ModelLoadError(f"{file}: cannot read safetensors file ({exc})") from exc


def _checkpoint_targets(model: nn.Module) -> dict[str, tuple[str, str | None]]:
    """Checkpoint tensor name -> (parameter name, shard), through the model's packed-module map. A fused
    parameter also takes its own name, whole: checkpoints that already fuse it (Phi-3's qkv_proj) load as is."""
    targets: dict[str, tuple[str, str | None]] = {}
    packed: dict[str, list[tuple[str, str]]] = getattr(model, "packed_modules", {})
    for name, _ in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        parent, _, module_name = module_path.rpartition(".")
        if module_name in packed:
            for part, shard in packed[module_name]:
                targets[f"{parent}.{part}.{leaf}" if parent else f"{part}.{leaf}"] = (name, shard)
        targets[name] = (name, None)  # a fused parameter also loads whole (Phi-3's qkv_proj is stored fused)
    # Layers whose checkpoint parts depend on the config (a tensor per expert) name them themselves.
    for module_name, module in model.named_modules():
        parts = getattr(module, "checkpoint_parts", None)
        if parts is not None:
            for part, (leaf, shard) in parts().items():
                targets[f"{module_name}.{part}"] = (f"{module_name}.{leaf}", shard)
    # Other spellings of the model's module names (its checkpoint_renames, old -> new) load the same.
    for old, new in getattr(model, "checkpoint_renames", {}).items():
        for name, target in list(targets.items()):
            if new in name:
                targets[name.replace(new, old)] = target
    return targets


def _missing_tensors(targets: dict[str, tuple[str, str | None]], loaded: set[tuple[str, str | None]]) -> list[str]:
    """Names of the checkpoint tensors no loaded one stood for. A parameter is complete when it was loaded
    whole or shard by shard (stacked experts take either layout; a fused layer, its fused tensor or each of
    its parts). With nothing of a sharded parameter loaded, the error names both ways to supply it."""
    names: dict[str, dict[str | None, str]] = {}
    for name, (param, shard) in targets.items():
        names.setdefault(param, {}).setdefault(shard, name)  # the first spelling names it in errors
    missing: list[str] = []
    for param, by_shard in names.items():
        if (param, None) in loaded:
            continue
        parts = {shard: name for shard, name in by_shard.items() if shard is not None}
        if not parts:
            missing.append(by_shard[None])
        elif any((param, shard) in loaded for shard in parts):
            missing.extend(name for shard, name in parts.items() if (param, shard) not in loaded)
        elif None in by_shard:
            missing.append(f"{by_shard[None]} (or {', '.join(parts.values())})")
        else:
            missing.extend(parts.values())
    return missing


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    """The loader of parameters that are one checkpoint tensor as they are (norm weights)."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ModelLoadError(f"shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded)


def _safetensors_tensors(model_path: Path) -> list[NamedTensor]:
    """Every tensor of the folder's safetensors files, read one at a time from its file."""
    out: list[NamedTensor] = []
    for file, names in _names_by_file(_tensor_index(model_path)).items():
        handle = _open(file)
        out.extend(NamedTensor(file.name, name, _reader(handle, file, name)) for name in names)
    return out


def _names_by_file(index: dict[str, Path]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name, file in index.items():
        by_file.setdefault(file, []).append(name)
    return by_file


def _reader(handle, file: Path, name: str) -> Callable[[], torch.Tensor]:  # handle: a safetensors file
    def read() -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise ModelLoadError(f"{file}: cannot read tensor {name!r} ({exc})") from exc

    return read


def fill_weights(model: nn.Module, tensors: list[NamedTensor], checkpoint: str, progress: bool = False) -> None:
    """Copy every checkpoint tensor into its parameter (or fused shard) through the parameter's weight loader;
    every parameter must be filled."""
    params = dict(model.named_parameters())
    targets = _checkpoint_targets(model)
    tied = getattr(getattr(model, "lm_head", None), "weight_is_shared", False)
    loaded: set[tuple[str, str | None]] = set()
    tensors = [t for t in tensors if not (t.name.endswith(_IGNORED_SUFFIXES) or (tied and t.name == "lm_head.weight"))]
    bar = ProgressBar(total=len(tensors), label="loading weights", enabled=progress)
    with torch.no_grad():
        for where, name, read in tensors:
            target = targets.get(name)
            if target is None:
                raise ModelLoadError(f"{where}: tensor {name!r} is not part of {type(model).__name__}")
            param_name, shard = target
            param = params[param_name]
            tensor = read()  # its errors name the file already
            try:
                getattr(param, "weight_loader", _copy_whole)(param, tensor, shard)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{where}: tensor {name!r}: {exc}") from exc
            loaded.add(target)
            bar.update()
    bar.close()
    needed = sorted(_missing_tensors(targets, loaded))
    if needed:
        missing = ", ".join(needed[:5]) + (" ..." if len(needed) > 5 else "")
        raise ModelLoadError(f"{checkpoint}: checkpoint lacks {len(needed)} tensor(s) the model needs: {missing}")
