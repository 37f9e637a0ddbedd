"""An EAGLE-style draft head and its folder: one decoder layer that predicts the target's next hidden state.

Input at position i: the embedding of token i and the target's (final-norm) hidden state of position i - 1
(zeros at position 0), concatenated as [hidden, embedding] and mapped back to the hidden size by `fc`; one
Llama decoder layer and a final RMSNorm give a predicted feature, which the target's own LM head turns into
logits. Indexing by the token's own position makes a head KV entry depend on tokens 0..i only, so the head's
KV in a prefix-cached block is as valid as the target's.

A head folder holds `config.json` (the fields of `EagleHeadConfig`) and `model.safetensors`: `fc.weight`,
`fc.bias`, `layers.0.*` in Llama's names, `norm.weight`, and, for a reduced draft vocabulary, `d2t`: the
target ids of the draft vocabulary (the head's LM head is then those rows of the target's).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.layers.attention import Attention
from tokenmill.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch_config import ArchConfig, parse_arch_config
from tokenmill.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from tokenmill.models.loader import NamedTensor, fill_weights, process_weights_after_loading

HEAD_ARCHITECTURE = "TokenmillEagleHead"
WEIGHTS_FILE = "model.safetensors"
DRAFT_VOCAB_TENSOR = "d2t"


@dataclass(frozen=True)
class EagleHeadConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    target_vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    draft_vocab_size: int | None = None  # None: the target's whole vocabulary
    architecture: str = HEAD_ARCHITECTURE

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, head_dir: str | Path) -> EagleHeadConfig:
        path = Path(head_dir) / "config.json"
        if not path.is_file():
            raise ConfigError("draft_model", f"{head_dir} is not an EAGLE head folder: it has no config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as exc:
            raise ConfigError("draft_model", f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("architecture") != HEAD_ARCHITECTURE:
            raise ConfigError("draft_model", f"{path}: architecture must be {HEAD_ARCHITECTURE!r} (an EAGLE head "
                                             f"written by `tokenmill distill --method eagle`)")
        known = {f.name for f in fields(cls)}
        missing = [name for name in _REQUIRED if name not in raw]
        if missing:
            raise ConfigError("draft_model", f"{path}: lacks {', '.join(missing)}")
        for name in _REQUIRED:
            if not isinstance(raw[name], int) or isinstance(raw[name], bool) or raw[name] < 1:
                raise ConfigError("draft_model", f"{path}: {name} must be a positive integer, got {raw[name]!r}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def check_against(self, target: ArchConfig, source: str) -> None:
        """The head must read the target's hidden states and speak its vocabulary."""
        for field_name, head_value, target_value in (
            ("hidden_size", self.hidden_size, target.hidden_size),
            ("target_vocab_size", self.target_vocab_size, target.vocab_size),
        ):
            if head_value != target_value:
                raise ConfigError("draft_model", f"{source}: {field_name} is {head_value}, the target's is "
                                                 f"{target_value}; this head was trained for another model")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= target.vocab_size:
            raise ConfigError("draft_model", f"{source}: draft_vocab_size {self.draft_vocab_size} must be in "
                                             f"[1, {target.vocab_size}] (the target's vocabulary)")

    def layer_arch(self) -> ArchConfig:
        """The head's decoder layer as a one-layer Llama config."""
        return parse_arch_config({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.target_vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": 1, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
        }, source="EAGLE head config.json")


_REQUIRED = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
             "target_vocab_size")


class EagleHead(nn.Module):
    packed_modules = LlamaForCausalLM.packed_modules  # q/k/v and gate/up load as Llama's do

    def __init__(self, config: EagleHeadConfig, target: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        arch = config.layer_arch()
        # Prepacked CPU weights exactly when the worker prepacked the target's (eager bf16 on a CPU that can).
        self.prepack_cpu = bool(getattr(target.lm_head.quant_method, "prepack_cpu", False))
        method = UnquantizedLinearMethod(prepack_cpu=self.prepack_cpu)
        hidden = config.hidden_size
        self.fc = ReplicatedLinear(2 * hidden, hidden, True, dtype, device, method)
        self.layers = nn.ModuleList([LlamaDecoderLayer(arch, 0, dtype, device, method)])
        self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling,
                                      arch.max_position_embeddings, dtype, device)
        # The target's embedding and LM head, shared (a tuple, so they are not the head's own parameters).
        self._target = (target,)
        self.draft_lm_head: ReplicatedLinear | None = None  # the target's rows of a reduced vocabulary
        self.draft_to_target: torch.Tensor | None = None  # [draft vocab] target ids

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def use_draft_vocab(self, draft_to_target: torch.Tensor) -> None:
        """Draft over these target ids only: the LM head becomes the target's rows of them."""
        weight = self.target.lm_head.weight
        rows = draft_to_target.to(weight.device)
        head = ReplicatedLinear(weight.shape[1], len(rows), False, weight.dtype, weight.device,
                                UnquantizedLinearMethod(prepack_cpu=self.prepack_cpu))
        with torch.no_grad():
            head.weight.copy_(weight[rows])
        head.quant_method.process_weights_after_loading(head)
        self.draft_lm_head, self.draft_to_target = head, rows

    def _inputs(self, input_ids: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
        embedded = self.target.model.embed_tokens(input_ids)
        return self.fc(torch.cat([prev_hidden.to(embedded.dtype), embedded], dim=-1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
        """Predicted target hidden states [T, hidden] of tokens input_ids at positions (KV written)."""
        cos, sin = self.rotary.cos_sin_at(positions)
        hidden, residual = self.layers[0](self._inputs(input_ids, prev_hidden), None, cos, sin)
        return self.norm.add_and_norm(hidden, residual)[0]

    def write_kv(self, input_ids: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor) -> None:
        """Only the layer's attention (its KV store): features of verified tokens are never needed."""
        cos, sin = self.rotary.cos_sin_at(positions)
        layer = self.layers[0]
        layer.self_attn(layer.input_layernorm(self._inputs(input_ids, prev_hidden)), cos, sin)

    def compute_logits(self, features: torch.Tensor) -> torch.Tensor:
        """float32 logits over the draft vocabulary (the target's whole one without a reduced vocabulary)."""
        if self.draft_lm_head is None:
            return self.target.compute_logits(features)
        return self.draft_lm_head(features).float()

    def attention_layers(self) -> list[Attention]:
        return [self.layers[0].self_attn.attn]


def load_eagle_head(head_dir: str | Path, target: nn.Module, target_arch: ArchConfig, dtype: torch.dtype,
                    device: torch.device) -> EagleHead:
    """The head of a folder, checked against the target it drafts for."""
    config = EagleHeadConfig.read(head_dir)
    config.check_against(target_arch, str(head_dir))
    weights = Path(head_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError("draft_model", f"{head_dir}: no {WEIGHTS_FILE}")
    head = EagleHead(config, target, dtype, device)
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
        names = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ConfigError("draft_model", f"{weights}: cannot read safetensors file ({exc})") from exc
    draft_to_target = handle.get_tensor(DRAFT_VOCAB_TENSOR) if DRAFT_VOCAB_TENSOR in names else None
    tensors = [NamedTensor(WEIGHTS_FILE, name, _reader(handle, name)) for name in names if name != DRAFT_VOCAB_TENSOR]
    try:
        fill_weights(head, tensors, str(head_dir))
    except ModelLoadError as exc:
        raise ConfigError("draft_model", str(exc)) from exc
    process_weights_after_loading(head)
    if (draft_to_target is None) != (config.draft_vocab_size is None):
        raise ConfigError("draft_model", f"{head_dir}: draft_vocab_size and the {DRAFT_VOCAB_TENSOR!r} tensor "
                                         f"come together (a reduced vocabulary needs both)")
    if draft_to_target is not None:
        _check_draft_vocab(draft_to_target, config, target_arch.vocab_size, str(head_dir))
        head.use_draft_vocab(draft_to_target.long())
    return head


def _check_draft_vocab(d2t: torch.Tensor, config: EagleHeadConfig, vocab_size: int, source: str) -> None:
    if d2t.dim() != 1 or len(d2t) != config.draft_vocab_size or d2t.is_floating_point():
        raise ConfigError("draft_model", f"{source}: {DRAFT_VOCAB_TENSOR} must be {config.draft_vocab_size} integer "
                                         f"token ids (draft_vocab_size), got {d2t.dtype} {tuple(d2t.shape)}")
    if len(d2t) and (int(d2t.min()) < 0 or int(d2t.max()) >= vocab_size):
        raise ConfigError("draft_model", f"{source}: {DRAFT_VOCAB_TENSOR} holds ids outside the target's "
                                         f"vocabulary [0, {vocab_size})")
    if len(torch.unique(d2t)) != len(d2t):
        raise ConfigError("draft_model", f"{source}: {DRAFT_VOCAB_TENSOR} repeats token ids")


def _reader(handle: Any, name: str) -> Any:
    return lambda: handle.get_tensor(name)
