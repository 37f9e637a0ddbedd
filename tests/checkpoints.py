"""Tiny random-weight checkpoints per family, built with transformers (the reference) for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tokenmill.tools.tiny_tokenizer import BOS, EOS, build_tiny_tokenizer

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe"]

_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    # Large enough that random logits have clear argmax margins for greedy comparisons.
    initializer_range=0.15,
)


def _config(family: str, num_layers: int, overrides: dict[str, Any]):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config, Qwen3MoeConfig)

    kw = dict(_COMMON, num_hidden_layers=num_layers)
    if family == "llama":
        cls, kw = LlamaConfig, dict(kw, head_dim=24, tie_word_embeddings=False)  # head_dim != hidden / heads
    elif family == "llama3":
        cls = LlamaConfig
        kw = dict(
            kw,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        )
    elif family == "mistral":
        cls, kw = MistralConfig, dict(kw, sliding_window=None, tie_word_embeddings=False)
    elif family == "qwen2":
        cls, kw = Qwen2Config, dict(kw, tie_word_embeddings=False)
    elif family == "qwen3":
        cls, kw = Qwen3Config, dict(kw, head_dim=16, tie_word_embeddings=True)
    elif family == "mixtral":
        cls = MixtralConfig
        kw = dict(kw, num_local_experts=8, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False)
    elif family == "qwen3_moe":
        # Layer 0 sparse, layer 1 dense (mlp_only_layers); top-k weights not renormalized (the default).
        cls = Qwen3MoeConfig
        kw = dict(kw, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                  decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=True)
    elif family == "phi3":
        # Fused qkv_proj / gate_up_proj tensors, RoPE on 3/4 of each head (as Phi-4-mini), a window on every layer.
        cls = Phi3Config
        kw = dict(kw, tie_word_embeddings=False, partial_rotary_factor=0.75, sliding_window=48, pad_token_id=0)
    elif family == "gemma2":
        # Caps low enough to bite on random weights; local and global layers alternate (a 32-token window).
        cls = Gemma2Config
        kw = dict(kw, head_dim=16, query_pre_attn_scalar=24, sliding_window=32, attn_logit_softcapping=5.0,
                  final_logit_softcapping=10.0, pad_token_id=0)
    elif family == "gemma3":
        # q/k norms, local layers on their own RoPE base, linear RoPE scaling on global layers, no caps.
        cls = Gemma3TextConfig
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        kw = dict(kw, head_dim=16, query_pre_attn_scalar=24, sliding_window=32, layer_types=layer_types,
                  rope_theta=100000.0, rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                  final_logit_softcapping=None, pad_token_id=0)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def make_checkpoint(
    family: str, out_dir: str | Path, *, seed: int = 0, num_layers: int = 2, shards: int = 1, **config_overrides: Any
) -> Path:
    """Write config, random float32 weights (safetensors, optionally sharded), tokenizer, generation config."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(out)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    config = _config(family, num_layers, dict(bos_token_id=bos, eos_token_id=eos, **config_overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen2":
        # transformers initialises biases to zero; make them matter.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.1)
    if family.startswith("gemma"):
        # Gemma's norms scale by (1 + weight) and start at zero; make the weights matter.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0.0, 0.2)
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(out, max_shard_size=max(total // shards, 1), safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [eos]}))
    return out


def make_perturbed_copy(src: str | Path, out_dir: str | Path, *, relative_noise: float, seed: int = 0) -> Path:
    """A copy of a checkpoint with every weight jittered: a draft that agrees with the target only often."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    for name, tensor in tensors.items():
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        tensors[name] = tensor + relative_noise * tensor.std().clamp_min(1e-3) * noise
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def greedy_tokens(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """A loaded transformers model's greedy generate, one prompt at a time (no padding), EOS suppressed for
    the length: the reference token lists the engine's outputs are compared with."""
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False)
            results.append(out[0, len(prompt):].tolist())
    return results
