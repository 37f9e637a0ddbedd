"""The trainable twin of the engine's EAGLE head (tokenmill/spec_decode/eagle_head.py), and its folder writer.

Same parameter names and the same computation as the engine's head: at position i, fc([target hidden of
i - 1, embedding of token i]) -> one Llama decoder layer -> RMSNorm = the predicted target hidden state of
position i, whose logits are the target's LM head's. Dense causal attention and autograd, for training; a
small dense KV cache (the training model's) for chain drafting when held-out acceptance is measured.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tokenmill.spec_decode.eagle_head import DRAFT_VOCAB_TENSOR, WEIGHTS_FILE, EagleHeadConfig
from tokenmill_train.model import DecoderLayer, KVCache, LlamaForCausalLM, ModelConfig, RMSNorm


def head_config_for(target: ModelConfig, draft_vocab_size: int | None = None) -> EagleHeadConfig:
    """A head whose decoder layer has the target's layer shapes."""
    assert target.head_dim is not None
    return EagleHeadConfig(
        hidden_size=target.hidden_size, num_attention_heads=target.num_attention_heads,
        num_key_value_heads=target.num_key_value_heads, head_dim=target.head_dim,
        intermediate_size=target.intermediate_size, target_vocab_size=target.vocab_size,
        rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta,
        max_position_embeddings=target.max_position_embeddings, draft_vocab_size=draft_vocab_size,
    )


class EagleHeadModel(nn.Module):
    def __init__(self, config: EagleHeadConfig, initializer_range: float = 0.02) -> None:
        super().__init__()
        self.config = config
        layer_config = ModelConfig(
            vocab_size=config.target_vocab_size, hidden_size=config.hidden_size, num_hidden_layers=1,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, head_dim=config.head_dim,
        )
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layers = nn.ModuleList([DecoderLayer(layer_config)])
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        dims = torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta ** dims), persistent=False)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(".bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=initializer_range)

    def forward(self, prev_hidden: torch.Tensor, embedded: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """[B, T, H] target hidden states of the positions before, [B, T, H] token embeddings -> features."""
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + embedded.shape[1], device=embedded.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        x = self.fc(torch.cat([prev_hidden, embedded], dim=-1))
        x = self.layers[0](x, angles.cos().to(x.dtype), angles.sin().to(x.dtype), cache, 0)
        return self.norm(x)


def shifted_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """Each position's input feature: the target hidden state of the position before (zeros at the first)."""
    return torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)


@torch.no_grad()
def draft_chain(head: EagleHeadModel, target: LlamaForCausalLM, tokens: torch.Tensor, hidden: torch.Tensor,
                at: int, depth: int, draft_vocab: torch.Tensor | None) -> list[int]:
    """Greedy chain of `depth` drafts after token `at` of one sequence [T] with target hidden states [T, H]:
    the head reads target features up to `at`, then its own (as the engine's proposer does)."""
    cache = KVCache(1)
    embed = target.model.embed_tokens
    context = tokens[None, : at + 1]
    features = head(shifted_hidden(hidden[None, : at + 1]), embed(context), cache)[:, -1:]
    drafts: list[int] = []
    for _ in range(depth):
        token = _greedy(target, features[0, 0], draft_vocab)
        drafts.append(token)
        features = head(features, embed(torch.tensor([[token]], device=tokens.device)), cache)
    return drafts


def _greedy(target: LlamaForCausalLM, feature: torch.Tensor, draft_vocab: torch.Tensor | None) -> int:
    if draft_vocab is None:
        return int(target.lm_head(feature).argmax())
    return int(draft_vocab[int((target.lm_head.weight[draft_vocab] @ feature).argmax())])


def save_head(head: EagleHeadModel, out_dir: str | Path, draft_vocab: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write the head folder the engine loads (config.json + model.safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().to(dtype).contiguous().cpu() for name, value in head.state_dict().items()}
    if draft_vocab is not None:
        tensors[DRAFT_VOCAB_TENSOR] = draft_vocab.to(torch.int64).contiguous().cpu()
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / "config.json").write_text(head.config.to_json())
    return out
