"""The identity a disk-tier file must match: which weights, in which dtype and KV layout, made its KV."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenmill.config import EngineConfig
from tokenmill.kv_tiers.block_file import TierIdentity

_HASHED_CHUNK = 1 << 20  # of a file too big to hash whole (a GGUF): its first MiB, with its size


def engine_identity(config: EngineConfig, model_dtype: str, kv_dtype: str, layout: list[str]) -> TierIdentity:
    """Model path and file hashes (config, tokenizer; weight file names and sizes), dtypes, block size, layout.

    Weights are identified by their files' names and sizes rather than hashed whole (gigabytes at every start);
    random weights (load_format=random) also by the seed they are drawn from."""
    model = Path(config.model).resolve()
    folder = model if model.is_dir() else model.parent
    weights = [model] if model.is_file() else sorted(folder.glob("*.safetensors"))
    fields = {
        "format": 1,
        "model": str(model),
        "config_hash": _hash_files([folder / "config.json"] if model.is_dir() else [model]),
        "weights": [f"{p.name}:{p.stat().st_size}" for p in weights],
        "tokenizer_hash": _hash_files([folder / "tokenizer.json", folder / "tokenizer_config.json"]),
        "dtype": model_dtype,
        "kv_cache_dtype": f"{config.cache.kv_cache_dtype}:{kv_dtype}",
        "block_size": config.cache.block_size,
        "quantization": config.quantization,
        "load_format": config.load_format,
        "layout": layout,
    }
    if config.load_format == "random":
        fields["seed"] = config.seed
    return TierIdentity(fields)


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        if path.is_file():
            size = path.stat().st_size
            with open(path, "rb") as file:
                digest.update(file.read(_HASHED_CHUNK))
            digest.update(f"{path.name}:{size}".encode())
    return digest.hexdigest()
