"""Reading and writing checkpoints: the standard HF folder we ship, and the resumable training state."""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from tokenmill.models.loader import TORCH_DTYPES
from tokenmill_train.model import LlamaForCausalLM, ModelConfig
from tokenmill_train.tokenizer_train import write_tokenizer_files

STATE_DIRNAME = "checkpoints"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_config_dict(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json for transformers' LlamaConfig. rope_theta is written both the transformers-4 way (top
    level) and the transformers-5 way (rope_parameters) so readers of either generation agree."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


def save_hf_checkpoint(
    model: LlamaForCausalLM,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int | None,
    dtype: str = "float32",
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json.

    With `tokenizer_dir` (a draft distilled from a target), the target's tokenizer files are copied verbatim
    so the pair shares ids, special tokens and chat template exactly.
    """
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"--save-dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (out / "config.json").write_text(
        json.dumps(hf_config_dict(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, dtype=dtype), indent=2)
    )
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tensors = {
        name: t.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
        for name, t in model.state_dict().items()
        # A tied head shares the embedding's storage; safetensors refuses shared tensors, and HF re-ties.
        if not (cfg.tie_word_embeddings and name == "lm_head.weight")
    }
    _atomic(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if tokenizer_dir is None:
        write_tokenizer_files(tokenizer, out, model_max_length=cfg.max_position_embeddings)
    else:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(str(folder / shard)))
        return tensors
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_hf_model(folder: str | Path, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Build the training model from a standard Llama checkpoint folder (fp32 weights, for training use)."""
    path = Path(folder)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is this a checkpoint folder?)")
    hf = json.loads(config_path.read_text())
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] != "LlamaForCausalLM":
        raise ValueError(f"{config_path}: architecture {archs[0]!r}; only LlamaForCausalLM can be loaded here")
    cfg = ModelConfig.from_hf_config(hf)
    tensors = _read_weights(path)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        # Some exporters drop the head when it equals the embedding even though tie_word_embeddings is unset.
        cfg.tie_word_embeddings = True
    model = LlamaForCausalLM(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return model.to(device)


# --- resumable training state ---------------------------------------------------------------------------


def _atomic(path: Path, write: Any) -> None:
    # Write to a temporary name, then rename: a run killed mid-save never leaves a truncated checkpoint.
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(out_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Save `state` as <out>/checkpoints/step_<N>.pt and keep only the newest `keep` of them."""
    folder = Path(out_dir) / STATE_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    _atomic(path, lambda p: torch.save(state, p))
    for old in list_training_states(out_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_training_states(out_dir: str | Path) -> list[Path]:
    folder = Path(out_dir) / STATE_DIRNAME
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if re.fullmatch(r"step_\d+\.pt", p.name))


def resolve_resume(resume: str, out_dir: str | Path) -> Path:
    """`--resume latest` picks the newest state under --out; otherwise it is a path to a state file."""
    if resume == "latest":
        states = list_training_states(out_dir)
        if not states:
            raise FileNotFoundError(f"--resume latest: no checkpoints under {Path(out_dir) / STATE_DIRNAME}")
        return states[-1]
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint file")
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG tuples and numpy arrays; these are files this tool wrote.
    return torch.load(path, map_location="cpu", weights_only=False)


def hardware_summary(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info
