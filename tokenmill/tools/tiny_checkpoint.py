"""`tokenmill make-tiny`: write a small random-weight Llama checkpoint folder, with nothing downloaded.

The folder has what a Hugging Face checkpoint has (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json), so tokenmill and transformers both
load it. The weights are random: the text it generates is noise, but every code path runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenmill.tools.tiny_tokenizer import BOS, EOS, build_tiny_tokenizer


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(out, vocab_size=vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    head_dim = hidden_size // num_heads
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id}, indent=2))

    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    tensors = {
        "model.embed_tokens.weight": normal(vocab_size, hidden_size),
        "model.norm.weight": torch.ones(hidden_size),
        "lm_head.weight": normal(vocab_size, hidden_size),
    }
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        tensors.update(
            {
                prefix + "self_attn.q_proj.weight": normal(q_size, hidden_size),
                prefix + "self_attn.k_proj.weight": normal(kv_size, hidden_size),
                prefix + "self_attn.v_proj.weight": normal(kv_size, hidden_size),
                prefix + "self_attn.o_proj.weight": normal(hidden_size, q_size),
                prefix + "mlp.gate_proj.weight": normal(intermediate_size, hidden_size),
                prefix + "mlp.up_proj.weight": normal(intermediate_size, hidden_size),
                prefix + "mlp.down_proj.weight": normal(hidden_size, intermediate_size),
                prefix + "input_layernorm.weight": torch.ones(hidden_size),
                prefix + "post_attention_layernorm.weight": torch.ones(hidden_size),
            }
        )
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
