"""The Llama family: Llama (incl. Llama-3.1 RoPE scaling), Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm),
Phi-3 (checkpoints with q/k/v and gate/up already fused; partial rotary; a sliding window on every layer).

q/k/v and gate/up are fused into one matmul each; `packed_modules` tells the loader which checkpoint
tensors are row shards of them, so checkpoints load by name (a checkpoint that already fuses them, as
Phi-3's do, loads into the fused weights whole). The model sees flat token tensors only;
attention reads the step's layout from the forward context.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.attention import Attention
from tokenmill.layers.linear import LMHead, MergedLinear, QuantMethod, ReplicatedLinear, VocabEmbedding
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch_config import ArchConfig


class LlamaAttention(nn.Module):
    """Fused q/k/v, optional q/k norms, RoPE, paged attention, output projection. Other families reuse it with
    their own norm class, q/k-norm choice, score scale and score soft-capping."""

    def __init__(self, config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device,
                 quant: QuantMethod | None, *, norm: type[RMSNorm] = RMSNorm, qk_norm: bool | None = None,
                 scale: float | None = None, softcap: float | None = None) -> None:
        super().__init__()
        heads, kv_heads, head_dim, hidden = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        self.qkv_proj = MergedLinear(hidden, [self.q_size, self.kv_size, self.kv_size], ["q", "k", "v"],
                                     config.qkv_bias, dtype, device, quant)
        self.o_proj = ReplicatedLinear(self.q_size, hidden, config.o_bias, dtype, device, quant)
        qk_norm = config.qk_norm if qk_norm is None else qk_norm
        self.q_norm = norm(head_dim, config.rms_norm_eps, dtype, device) if qk_norm else None
        self.k_norm = norm(head_dim, config.rms_norm_eps, dtype, device) if qk_norm else None
        window = config.sliding_window if config.sliding_layers[layer_index] else None
        scale = head_dim**-0.5 if scale is None else scale
        self.attn = Attention(heads, kv_heads, head_dim, scale, sliding_window=window, softcap=softcap)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k are adjacent in qkv: one rotation covers both heads' groups.
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.heads + self.kv_heads, self.head_dim)
            qk = RotaryEmbedding.rotate(qk, cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
        else:
            assert self.k_norm is not None
            q = self.q_norm(qkv[:, : self.q_size].view(num_tokens, self.heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, self.kv_heads, self.head_dim))
            q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    """Gated MLP: fused gate/up, a gated activation (SwiGLU unless given another), down projection."""

    def __init__(self, config: ArchConfig, dtype: torch.dtype, device: torch.device, quant: QuantMethod | None,
                 act: nn.Module | None = None) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], ["gate", "up"], False, dtype, device, quant)
        self.down_proj = ReplicatedLinear(size, config.hidden_size, False, dtype, device, quant)
        self.act = act or SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


# Builds a layer's MLP: (config, layer index, dtype, device, quant) -> module of [T, hidden] -> [T, hidden].
# Families whose MLP differs (mixtures of experts) pass their own; the rest of the layer is shared.
MlpFactory = Callable[[ArchConfig, int, torch.dtype, torch.device, QuantMethod | None], nn.Module]


def dense_mlp(config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device,
              quant: QuantMethod | None) -> nn.Module:
    return LlamaMLP(config, dtype, device, quant)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device,
                 quant: QuantMethod | None, make_mlp: MlpFactory = dense_mlp) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(config, layer_index, dtype, device, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = make_mlp(config, layer_index, dtype, device, quant)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added): adds are fused into the norms."""
        hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ArchConfig, dtype: torch.dtype, device: torch.device, quant: QuantMethod | None,
                 make_mlp: MlpFactory = dense_mlp) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype, device, quant, make_mlp)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings, dtype, device, config.partial_rotary_factor)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin_at(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        assert residual is not None
        return self.norm.add_and_norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    # Checkpoint tensors that are row shards of one fused layer: fused name -> [(checkpoint name, shard)].
    packed_modules = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", "gate"), ("up_proj", "up")],
    }
    # Checkpoint name pieces spelled differently from this model's module names: old -> new.
    checkpoint_renames: dict[str, str] = {}
    make_mlp: MlpFactory = staticmethod(dense_mlp)

    def __init__(self, config: ArchConfig, dtype: torch.dtype, device: torch.device,
                 quant: QuantMethod | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, device, quant, self.make_mlp)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, False, dtype, device, quant)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat [T] ids and positions -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
