"""A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) read into plain tensors.

Each targeted module keeps its A [r, in] and its B [out, r] already multiplied by the module's scaling
(lora_alpha / r, or / sqrt(r) with rsLoRA; per-module ranks and alphas from rank_pattern / alpha_pattern), so
applying it is B (A x). Its identity is a hash of the files' bytes: the prefix cache keys KV by it (equal
adapters share KV, different ones never do, whatever their names).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from tokenmill.errors import InvalidRequestError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}


@dataclass(frozen=True)
class PeftAdapter:
    path: str
    identity: str  # hex hash of the config and weights
    rank: int  # the largest rank of any module
    # PEFT module name (model.layers.0.self_attn.q_proj) -> (A [r, in], scaled B [out, r]), float32
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_peft_adapter(path: str | Path, field: str = "lora_path") -> PeftAdapter:
    """Read and check an adapter folder; any problem raises InvalidRequestError naming `field`."""
    folder = Path(path)
    config_bytes, weight_bytes = _read(folder / CONFIG_FILE, field), _read(folder / WEIGHTS_FILE, field)
    try:
        config = json.loads(config_bytes)
        tensors = load_safetensors(weight_bytes)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the caller's input
        raise InvalidRequestError(field, f"{folder}: not a readable PEFT adapter ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidRequestError(field, f"{folder / CONFIG_FILE}: must hold a JSON object")
    _check_config(config, folder, field)
    pairs: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PREFIX):
            raise InvalidRequestError(field, f"{folder.name}: tensor {key!r} is not a LoRA A/B weight (embedding "
                                             f"targets, DoRA magnitudes, biases and saved modules are not supported)")
        pairs.setdefault(key[len(_PREFIX) : -len(suffix)], [None, None])[_SUFFIXES[suffix]] = tensor
    if not pairs:
        raise InvalidRequestError(field, f"{folder / WEIGHTS_FILE}: holds no LoRA weights")
    modules = {name: _scaled(name, a, b, config, folder, field) for name, (a, b) in pairs.items()}
    identity = hashlib.blake2b(config_bytes + b"\0" + weight_bytes, digest_size=16).hexdigest()
    return PeftAdapter(str(folder), identity, max(a.shape[0] for a, _ in modules.values()), modules)


def _read(file: Path, field: str) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(field, f"cannot read {file} ({exc.strerror or exc})") from None


def _check_config(config: dict[str, Any], folder: Path, field: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidRequestError(field, f"{folder.name}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise InvalidRequestError(field, f"{folder.name}: {key}=true is not supported")
    if config.get("bias", "none") != "none":
        raise InvalidRequestError(field, f"{folder.name}: bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise InvalidRequestError(field, f"{folder.name}: modules_to_save is not supported")
    if not isinstance(config.get("lora_alpha", 8), (int, float)):
        raise InvalidRequestError(field, f"{folder.name}: lora_alpha must be a number")


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _scaled(name: str, a: torch.Tensor | None, b: torch.Tensor | None, config: dict[str, Any], folder: Path,
            field: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a is None or b is None:
        raise InvalidRequestError(field, f"{folder.name}: module {name} has only one of lora_A / lora_B")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
        raise InvalidRequestError(field, f"{folder.name}: module {name} has A {tuple(a.shape)} and B "
                                         f"{tuple(b.shape)}, not [r, in] and [out, r]")
    rank = a.shape[0]
    alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return a.float(), b.float() * scaling
