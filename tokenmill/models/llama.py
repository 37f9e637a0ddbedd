"""The Llama family: Llama (incl. Llama-3.1 RoPE scaling), Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

Parameter names mirror the Hugging Face checkpoints, so loading is a lookup by name. The model sees flat
token tensors only; attention reads the step's layout from the forward context.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.attention import Attention
from tokenmill.layers.linear import Embedding, Linear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary
from tokenmill.models.arch_config import ArchConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        heads, kv_heads, head_dim, hidden = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        self.q_proj = Linear(hidden, heads * head_dim, config.qkv_bias, dtype, device)
        self.k_proj = Linear(hidden, kv_heads * head_dim, config.qkv_bias, dtype, device)
        self.v_proj = Linear(hidden, kv_heads * head_dim, config.qkv_bias, dtype, device)
        self.o_proj = Linear(heads * head_dim, hidden, config.o_bias, dtype, device)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device) if config.qk_norm else None
        window = config.sliding_window if config.sliding_layers[layer_index] else None
        self.attn = Attention(heads, kv_heads, head_dim, head_dim**-0.5, sliding_window=window)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, False, dtype, device)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, False, dtype, device)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, False, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(config, layer_index, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype, device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, device)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat [T] ids and positions -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
