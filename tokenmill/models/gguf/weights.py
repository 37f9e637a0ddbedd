"""GGUF tensors -> NamedTensors (checkpoint name, reader) for the shared weight filler in models/loader.py.

Tensors are renamed to the transformers names the model's packed-module map already knows (blk.N.attn_q
-> model.layers.N.self_attn.q_proj), so fused q/k/v and gate/up load through the same weight loaders as
safetensors. Two things differ from a transformers checkpoint:
- llama.cpp's converter permutes the rows of q and k in llama-architecture files, from rotate-half to
  interleaved rotary pairs; reading reverses it (qwen2/qwen3 files are written in rotate-half order).
- weights may be quantized: each is dequantized to float32 as it is read, then cast by its loader; or, for a
  model built with a quantization spec, linear layers' weights become the canonical quantized tensors
  (<layer>.qweight / .scales / .qzeros, gguf/canonical.py) and only embeddings and the LM head are dequantized.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.gguf.canonical import canonical_weight, is_linear_tensor, repacks_exactly
from tokenmill.models.gguf.dequant import UnsupportedType, dequantize, load_dequantizer
from tokenmill.models.gguf.ggml_types import type_name
from tokenmill.models.gguf.reader import GGUFFile, TensorInfo
from tokenmill.models.loader import NamedTensor
from tokenmill.models.quantized_checkpoint import canonical_leaves, split_reader
from tokenmill.quant.codes import QuantSpec

logger = logging.getLogger(__name__)

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """blk.3.ffn_up.weight -> model.layers.3.mlp.up_proj.weight; names it does not know stay as they are."""
    stem, dot, leaf = gguf_name.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}.{leaf}"
    return gguf_name


def unpermute_rotary_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, rows (pair j, half h) go back to (half h, pair j)."""
    shape = tensor.shape
    head_rows = shape[0] // num_heads
    return tensor.reshape(num_heads, head_rows // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_tensors(gguf: GGUFFile, arch: ArchConfig, spec: QuantSpec | None = None) -> list[NamedTensor]:
    """Every tensor of the file as a NamedTensor; unsupported tensor types are reported before any is read.
    With `spec`, linear weights come as that spec's canonical tensors instead of one float weight."""
    permuted = gguf.metadata.get("general.architecture") == "llama"
    out: list[NamedTensor] = []
    requantized: Counter[str] = Counter()
    for info in gguf.tensors.values():
        if info.name == "rope_freqs.weight":  # the rotary embedding's, read into the config (config.py)
            continue
        try:
            load_dequantizer(info.type_id)
        except UnsupportedType as exc:
            raise gguf.error(f"tensor {info.name} has type {type_name(info.type_id)}{exc}") from exc
        heads = None
        if permuted and info.name.startswith("blk.") and info.name.split(".")[2] in ("attn_q", "attn_k"):
            heads = arch.num_heads if info.name.split(".")[2] == "attn_q" else arch.num_kv_heads
        if spec is not None and is_linear_tensor(info):
            if not repacks_exactly(info.type_id, spec):
                requantized[type_name(info.type_id)] += 1
            out.extend(_canonical_tensors(gguf, info, heads, spec))
        else:
            out.append(NamedTensor(gguf.path.name, hf_name(info.name), _reader(gguf, info, heads)))
    if spec is not None and requantized:
        counts = ", ".join(f"{n} {name}" for name, n in sorted(requantized.items()))
        group = f" g{spec.group_size}" if spec.group_size else ""
        logger.warning("%s: %d linear tensors (%s) have no exact %s%s layout; dequantized and re-quantized "
                       "round-to-nearest", gguf.path.name, sum(requantized.values()), counts, spec.method, group)
    return out


def _canonical_tensors(gguf: GGUFFile, info: TensorInfo, rotary_heads: int | None,
                       spec: QuantSpec) -> list[NamedTensor]:
    """<layer>.qweight, .scales (and .qzeros) of one linear tensor, converted once when the first is read."""

    def convert() -> dict[str, torch.Tensor]:
        qweight, scales, qzeros = canonical_weight(gguf.raw(info), info, spec)
        parts = {"qweight": qweight, "scales": scales} | ({} if qzeros is None else {"qzeros": qzeros})
        if rotary_heads is None:
            return parts
        return {k: unpermute_rotary_rows(v, rotary_heads) for k, v in parts.items()}  # rows: output channels

    return split_reader(gguf.path.name, hf_name(info.name).removesuffix(".weight"), canonical_leaves(spec), convert)


def _reader(gguf: GGUFFile, info: TensorInfo, rotary_heads: int | None) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        tensor = dequantize(gguf.raw(info), info.type_id, info.shape)
        return tensor if rotary_heads is None else unpermute_rotary_rows(tensor, rotary_heads)

    return read


@contextmanager
def one_thread() -> Iterator[None]:
    """Dequantize on one thread: a tensor takes ~10 small elementwise ops, and on a busy machine every
    multi-threaded op waits for a descheduled OpenMP worker (measured: 13 s instead of 0.7 s for SmolLM2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
