"""Tiny GGUF files for tests: a tiny transformers checkpoint written the way llama.cpp's converter writes it.

Metadata under `{arch}.*`, the tokenizer as `tokenizer.ggml.*` (byte-level BPE as "gpt2", or a
sentencepiece-style vocabulary as "llama": tokens, scores, token types, no merges), q/k rows permuted for
llama-architecture files, matrices in the requested ggml type (norms stay F32, as llama.cpp keeps them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tokenmill.tools.tiny_tokenizer import build_tiny_sentencepiece_tokenizer

_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def _engine_has_quantization() -> bool:
    import dataclasses

    from tokenmill.engine_args import EngineArgs

    return "quantization" in {f.name for f in dataclasses.fields(EngineArgs)}


# Engines load a quantized GGUF file quantized by default (its linear layers repacked, not dequantized); the
# comparisons with transformers, which dequantizes, ask for the dequantized weights. Empty until the engine
# has the `quantization` setting.
DEQUANTIZED: dict[str, str] = {"quantization": "none"} if _engine_has_quantization() else {}


def gguf_name(hf_name: str) -> str:
    stem, _, leaf = hf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{leaf}"
    _, _, index, rest = stem.split(".", 3)
    return f"blk.{index}.{_LAYER_NAMES[rest]}.{leaf}"


def permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation of llama q/k rows: per head, (half, pair) -> (pair, half)."""
    shape = weight.shape
    return weight.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def make_gguf(family: str, root: Path, *, tensor_type: str = "F32", tokenizer: str = "gpt2",
              raw_types: dict[str, str] | None = None, **overrides) -> Path:
    """A tiny random checkpoint of `family` in root/hf, written as root/gguf/model.gguf (a folder of its own:
    transformers would prefer a tokenizer.json beside the file to the file's own tokenizer)."""
    from tests.checkpoints import make_checkpoint

    if tokenizer == "llama":  # the model's vocabulary is the sentencepiece tokenizer's
        overrides.setdefault("vocab_size", build_tiny_sentencepiece_tokenizer(root / "sp").get_vocab_size())
    checkpoint = make_checkpoint(family, root / "hf", **overrides)
    (root / "gguf").mkdir(parents=True, exist_ok=True)
    tok_dir = root / "sp" if tokenizer == "llama" else checkpoint
    return write_gguf(checkpoint, tok_dir, root / "gguf" / "model.gguf", tensor_type=tensor_type, tokenizer=tokenizer,
                      raw_types=raw_types)


def write_gguf(checkpoint: Path, tok_dir: Path, out_file: Path, *, tensor_type: str = "F32",
               tokenizer: str = "gpt2", raw_types: dict[str, str] | None = None) -> Path:
    """Write `out_file` from a tiny checkpoint folder and a tokenizer folder (tokenizer.json + config);
    `raw_types` writes the named GGUF tensors as zero bytes of another ggml type."""
    import gguf

    config = json.loads((checkpoint / "config.json").read_text())
    arch = _ARCH[config["model_type"]]
    writer = gguf.GGUFWriter(str(out_file), arch)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    _add_tokenizer(writer, tok_dir, tokenizer, pre="qwen2" if arch in ("qwen2", "qwen3") else "gpt-2")
    scaling = config.get("rope_scaling") or rope
    if scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(scaling, head_dim, rope.get("rope_theta", 1e4)))

    qtype = gguf.GGMLQuantizationType[tensor_type]
    for name, tensor in load_file(checkpoint / "model.safetensors").items():
        tensor = tensor.astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = permute_rotary_rows(tensor, heads if "q_proj" in name else kv_heads)
        if gguf_name(name) in (raw_types or {}):
            raw = gguf.GGMLQuantizationType[raw_types[gguf_name(name)]]
            zeros = np.zeros(gguf.quants.quant_shape_to_byte_shape(tensor.shape, raw), dtype=np.uint8)
            writer.add_tensor(gguf_name(name), zeros, raw_dtype=raw)
        elif tensor.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for Llama-3 scaling: one divisor per frequency."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / head_dim))
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_tokenizer(writer, tok_dir: Path, kind: str, pre: str) -> None:
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = set()
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
        if added["special"]:
            special.add(added["content"])
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    ids = {t: i for i, t in enumerate(tokens)}
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    if kind == "llama":
        types = [UNKNOWN if t == "<unk>" else CONTROL if t in special else
                 BYTE if t.startswith("<0x") and len(t) == 6 else NORMAL for t in tokens]
        writer.add_token_scores([0.0 if types[i] != NORMAL else -float(i) for i in range(len(tokens))])
        writer.add_token_types(types)
        writer.add_add_bos_token(True)
        writer.add_unk_token_id(ids["<unk>"])
    else:
        writer.add_tokenizer_pre(pre)  # "qwen2": split by Qwen2's regex; "gpt-2": ByteLevel's own
        # <think> tags as user-defined tokens (matched whole, kept by decode), the way Qwen3 files mark them
        writer.add_token_types([USER_DEFINED if t in ("<think>", "</think>") else CONTROL if t in special
                                else NORMAL for t in tokens])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
        writer.add_add_bos_token(False)
    for key, setter in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                        ("pad_token", writer.add_pad_token_id)):
        value = cfg.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if content is not None:
            setter(ids[content])
    writer.add_chat_template(cfg["chat_template"])
