"""Gemma 2 and Gemma 3 (text): the Llama blocks with Gemma's quirks.

- RMSNorm scales by (1 + weight), and every block is sandwiched: norms before and after attention and
  before and after the MLP;
- embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype first (as the reference does);
- the MLP is GeGLU (tanh-approximated GELU);
- attention scores are scaled by query_pre_attn_scalar ** -0.5; local (sliding-window) and global layers
  interleave;
- Gemma 2 soft-caps attention scores (attn_logit_softcapping) and the final logits (final_logit_softcapping);
- Gemma 3 adds q/k norms, rotates local layers with their own RoPE base (rope_local_base_freq) while global
  layers use rope_theta and its scaling, and caps only the final logits when configured.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.kernels.reference import soft_cap
from tokenmill.layers.activation import GeluTanhAndMul
from tokenmill.layers.attention import Attention
from tokenmill.layers.linear import LMHead, QuantMethod, VocabEmbedding
from tokenmill.layers.norm import OffsetRMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP

# Activation names under which checkpoints ask for GELU with the tanh approximation.
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new")


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device,
                 quant: QuantMethod | None, qk_norm: bool, attn_softcap: float | None) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.is_local = config.sliding_layers[layer_index]  # picks the local RoPE table when the model has one
        self.input_layernorm = OffsetRMSNorm(hidden, eps, dtype, device)
        self.self_attn = LlamaAttention(config, layer_index, dtype, device, quant, norm=OffsetRMSNorm,
                                        qk_norm=qk_norm, scale=scale, softcap=attn_softcap)
        self.post_attention_layernorm = OffsetRMSNorm(hidden, eps, dtype, device)
        self.pre_feedforward_layernorm = OffsetRMSNorm(hidden, eps, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device, quant, act=GeluTanhAndMul())
        self.post_feedforward_layernorm = OffsetRMSNorm(hidden, eps, dtype, device)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's normed MLP output, the residual stream before it is added): adds fused into norms."""
        hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, cos, sin))
        hidden, residual = self.pre_feedforward_layernorm.add_and_norm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: ArchConfig, dtype: torch.dtype, device: torch.device, quant: QuantMethod | None,
                 qk_norm: bool, attn_softcap: float | None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype, device)
        # sqrt(hidden) in the model dtype: in bfloat16 the reference multiplies by the rounded value.
        scale = torch.tensor(config.hidden_size**0.5).to(dtype=dtype, device=device)
        self.register_buffer("embed_scale", scale, persistent=False)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i, dtype, device, quant, qk_norm, attn_softcap)
                                    for i in range(config.num_layers))
        self.norm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings, dtype, device, config.partial_rotary_factor)
        self.local_rotary = None
        if config.rope_local_theta is not None:  # Gemma 3: local layers' own base, never scaled
            self.local_rotary = RotaryEmbedding(config.head_dim, config.rope_local_theta, None,
                                                config.max_position_embeddings, dtype, device,
                                                config.partial_rotary_factor)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embed_scale
        global_cos_sin = self.rotary.cos_sin_at(positions)
        local_cos_sin = global_cos_sin if self.local_rotary is None else self.local_rotary.cos_sin_at(positions)
        residual = None
        for layer in self.layers:
            cos, sin = local_cos_sin if layer.is_local else global_cos_sin
            hidden, residual = layer(hidden, residual, cos, sin)
        assert residual is not None
        return self.norm.add_and_norm(hidden, residual)[0]


class Gemma2ForCausalLM(nn.Module):
    packed_modules = LlamaForCausalLM.packed_modules
    qk_norm = False
    caps_attention = True  # whether attn_logit_softcapping applies

    def __init__(self, config: ArchConfig, dtype: torch.dtype, device: torch.device,
                 quant: QuantMethod | None = None) -> None:
        super().__init__()
        if config.hidden_act not in _GELU_TANH:
            raise ModelLoadError(f"{config.architecture}: hidden_activation {config.hidden_act!r} is not supported "
                                 f"(supported: {', '.join(_GELU_TANH)})")
        self.config = config
        attn_softcap = config.attn_logit_softcapping if self.caps_attention else None
        self.model = GemmaModel(config, dtype, device, quant, self.qk_norm, attn_softcap)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, False, dtype, device, quant)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)  # the plain matrix: the embedding scale is not tied

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat [T] ids and positions -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.config.final_logit_softcapping is not None:
            logits = soft_cap(logits, self.config.final_logit_softcapping)  # in the model dtype, as the reference
        return logits.float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    # transformers' Gemma 3 normalises q and k, and never passes attn_logit_softcapping to attention.
    qk_norm = True
    caps_attention = False
