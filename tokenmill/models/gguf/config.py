"""GGUF metadata -> the HF-style config dict that `parse_arch_config` reads, so ArchConfig has one owner.

llama.cpp writes a model's shape under `{arch}.<key>` (block_count, embedding_length, ...); the
vocabulary size is the length of `tokenizer.ggml.tokens`, and an absent `output.weight` means the LM head
is tied to the embedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenmill.models.arch_config import ArchConfig, parse_arch_config
from tokenmill.models.gguf.canonical import gguf_quant_entry
from tokenmill.models.gguf.dequant import dequantize
from tokenmill.models.gguf.reader import GGUFFile

# general.architecture -> (HF architectures name, model_type); llama covers Llama, Mistral and SmolLM files.
SUPPORTED_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# {arch}.<key> -> HF config field.
_FIELDS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
}
_GGML_F32, _GGML_F16, _GGML_BF16 = 0, 1, 30


def gguf_architecture(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise gguf.error("metadata lacks general.architecture (which model this file holds)")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise gguf.error(f"architecture {arch!r} is not supported (supported: {supported})")
    return arch


def _scalar(gguf: GGUFFile, key: str, value: Any) -> Any:
    """A per-layer array with one value for every layer is that value; varying ones this model cannot run."""
    if isinstance(value, (np.ndarray, list)):
        values = set(np.asarray(value).tolist())
        if len(values) != 1:
            raise gguf.error(f"{key} varies by layer ({sorted(values)}); tokenmill needs one value for all layers")
        return values.pop()
    return value


def gguf_config_dict(gguf: GGUFFile) -> dict[str, Any]:
    """The config.json a transformers checkpoint of this file would have (the fields tokenmill reads)."""
    arch = gguf_architecture(gguf)
    meta = gguf.metadata
    architecture, model_type = SUPPORTED_ARCHITECTURES[arch]
    config: dict[str, Any] = {"architectures": [architecture], "model_type": model_type}
    for key, field in _FIELDS.items():
        if f"{arch}.{key}" in meta:
            config[field] = _scalar(gguf, f"{arch}.{key}", meta[f"{arch}.{key}"])
    # The head width: stated as the key length, or (llama) as the rotary width, else hidden / heads.
    head_dim = meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count"))
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    tokens = meta.get("tokenizer.ggml.tokens")
    embedding = gguf.tensors.get("token_embd.weight")
    if tokens is not None:
        config["vocab_size"] = len(tokens)
    elif embedding is not None:
        config["vocab_size"] = embedding.shape[0]
    config["tie_word_embeddings"] = "output.weight" not in gguf.tensors
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": meta.get(f"{arch}.rope.scaling.factor"),
            "original_max_position_embeddings": meta.get(f"{arch}.rope.scaling.original_context_length"),
        }
    if "rope_freqs.weight" in gguf.tensors:
        config["rope_scaling"] = _rope_freqs(gguf, config)
    config["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    # The end-of-turn token ends a chat reply as EOS ends the text: both stop generation.
    stops = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    config["eos_token_id"] = list(dict.fromkeys(int(t) for t in stops if t is not None))
    config["torch_dtype"] = _natural_dtype(gguf)
    quantization = gguf_quant_entry(gguf)  # the spec its linear layers' block types map onto (canonical.py)
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


def _rope_freqs(gguf: GGUFFile, config: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's form of Llama-3 RoPE scaling: no scaling keys, a tensor of one divisor per frequency."""
    info = gguf.tensors["rope_freqs.weight"]
    factors = dequantize(gguf.raw(info), info.type_id, info.shape).reshape(-1)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if factors.numel() != head_dim // 2:
        raise gguf.error(f"rope_freqs.weight has {factors.numel()} factors, expected one per frequency "
                         f"({head_dim // 2})")
    return {"rope_type": "llama3", "factor": float(factors.max()), "inv_freq_factors": factors.tolist(),
            "original_max_position_embeddings": config.get("max_position_embeddings")}


def _natural_dtype(gguf: GGUFFile) -> str:
    """The dtype "auto" loads in: the file's float type when it has one, float32 for quantized weights (their
    dequantized values are exact in float32; bfloat16 would round them a second time, which flips near-tied
    greedy choices of a small model such as SmolLM2's first answer token)."""
    matrix_types = {t.type_id for t in gguf.tensors.values() if len(t.shape) == 2}
    if matrix_types <= {_GGML_F16, _GGML_F32} and _GGML_F16 in matrix_types:
        return "float16"
    if matrix_types <= {_GGML_BF16, _GGML_F32} and _GGML_BF16 in matrix_types:
        return "bfloat16"
    return "float32"


def gguf_arch_config(gguf: GGUFFile) -> ArchConfig:
    return parse_arch_config(gguf_config_dict(gguf), source=str(gguf.path))
